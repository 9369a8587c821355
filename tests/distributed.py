"""Run a test function on several CPU processes joined by gloo, each with a process grid."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_exp.parallel import state

# Ranks fork from a server that has imported torch and the package once per session: a fresh interpreter per rank
# (spawn) spent ~1.7 s of every 2-rank test importing them. The server is itself a fresh interpreter (started by the
# first multi-rank test) that imports only these modules, so every rank still starts clean: no grid, no seeds, no
# compiled graphs or patched settings of the test process. Dynamo is preloaded too: the package imports it only to
# compile, but torch.optim imports it (~1 s) in every rank that builds an optimizer.
mp.set_forkserver_preload(["tests.distributed", "tests.conftest", "megatron_exp.training.trainer", "torch._dynamo"])


def _worker(rank, world_size, init_file, tp, pp, fn, args):
    torch.set_num_threads(1)  # the ranks share two cores; oversubscription only slows them down
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        state.initialize(tp, pp, timeout=timedelta(seconds=60))
        fn(*args)
        dist.barrier()  # tear down together: gloo can abort if a peer destroys its groups mid-exchange
    finally:
        state.destroy()


def run_on_ranks(world_size: int, fn, *args, tp: int | None = None, pp: int = 1) -> None:
    """Call `fn(*args)` on every rank of a `world_size` job with TP size `tp` (default: all ranks in one TP
    group, or world / pp) and PP size `pp`. `fn` must be importable (a module-level function); an assertion on
    any rank fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(
            _worker,
            args=(world_size, init_file, tp or world_size // pp, pp, fn, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
