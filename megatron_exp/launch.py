"""Start the workers: spawn tp x dp processes on this node through torch's elastic launcher (the engine behind
torchrun), or, when this process was itself started by torchrun, join that job as one of its ranks.

A failing worker stops the others (no restarts) and the launcher raises with that worker's error; collectives
time out after parallel.timeout_s instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, LogsDest, SignalException, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from megatron_exp import console, failures
from megatron_exp.config import HardwareConfig, ParallelConfig, RunSpec
from megatron_exp.hardware import keep_freed_cpu_memory
from megatron_exp.parallel import state
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training import stop

log = logging.getLogger(__name__)


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003", "node7,node8" -> "node7"."""
    prefix, ranges = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist).groups()
    return prefix if ranges is None else prefix + re.split(r"[,-]", ranges)[0]


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables for a rank started as one SLURM task (srun, or the submitit launcher)."""
    world = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world // nodes),
        "MASTER_ADDR": first_host(env["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000)),
    }


def joins_existing_job() -> bool:
    """True when this process is one rank of a job started by torchrun or SLURM (with several tasks), which it
    joins instead of spawning workers; SLURM's variables are translated into torch.distributed's here."""
    if started_by_torchrun():
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        os.environ.update(slurm_environment(dict(os.environ)))
        return True
    return False


def start_worker(hardware: HardwareConfig, parallel: ParallelConfig) -> ProcessGrid:
    """This rank's share of the machine (CPU threads; its GPU is chosen where the process group starts), then the
    process grid."""
    if hardware.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        keep_freed_cpu_memory()
    timeout = timedelta(seconds=parallel.timeout_s)
    return state.initialize(parallel.tp, parallel.pp, backend=hardware.backend, timeout=timeout)


def run_rank(work: Callable[[RunSpec, ProcessGrid], dict | None], spec: RunSpec) -> dict | None:
    """One rank: the grid, `work(spec, grid)`, teardown together. Returns global rank 0's result, else None.

    SIGINT and SIGTERM become a stop request that the training loop honours at a step boundary (training/stop.py);
    a collective that times out is followed by a check of who stopped answering (failures.diagnose_timeout)."""
    cfg = spec.config
    grid = start_worker(cfg.hardware, cfg.parallel)
    stop.listen()
    try:
        result = work(spec, grid)
        _teardown_together(grid, cfg)
        return result if grid.rank == 0 else None
    except Exception as error:
        if grid.control is not None and failures.is_collective_timeout(error):
            failures.diagnose_timeout(grid.control, min(cfg.parallel.timeout_s, 60))
        raise
    finally:
        state.destroy()


def _teardown_together(grid: ProcessGrid, cfg) -> None:
    """Wait for every rank before destroying the groups (gloo can abort if a peer destroys its groups
    mid-exchange). Through the job's store, not a collective: rank 0 may still be finishing W&B (whose start is
    bounded by logger.init_timeout_s), and no rank should hit parallel.timeout_s waiting for that (an entry point
    without a logger, such as generation, waits for its collectives only)."""
    if grid.control is None:
        return
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"megatron_exp/done/{rank}", "1")
    logger = getattr(cfg, "logger", None)
    seconds = cfg.parallel.timeout_s + (logger.init_timeout_s if logger else 0) + 60
    store.wait([f"megatron_exp/done/{r}" for r in range(world)], timedelta(seconds=seconds))


@record
def _spawned_worker(
    work: Callable[[RunSpec, ProcessGrid], dict | None], spec: RunSpec, log_file: Path | None
) -> dict | None:
    """A worker spawned by `spawn`; @record passes its exception back to the launcher."""
    rank = int(os.environ["RANK"])
    console.setup_rank(rank, log_file, spawned=True)
    # Every rank says where it runs, so a stuck or killed rank can be found (logs/<job>/attempt_0/<rank>/).
    log.info("rank %d of %s: pid %d on %s", rank, os.environ["WORLD_SIZE"], os.getpid(), socket.gethostname())
    try:
        return run_rank(work, spec)
    except stop.Interrupted as stopped:
        sys.exit(stopped.exit_code)  # a stop, not an error: no error file, and the launcher reports the signal


def run(
    spec: RunSpec, work: Callable[[RunSpec, ProcessGrid], dict | None], log_file: Path | None = None
) -> dict | None:
    """`work(spec, grid)` on every rank of the job: this process as one rank of its torchrun/SLURM job, or
    `spec.workers` processes spawned on this node, rank 0 appending its log to `log_file`. Returns global rank 0's
    result (None on the other ranks)."""
    if spec.joined:
        return run_rank(work, spec)
    return spawn(_spawned_worker, (work, spec, log_file), spec.workers, spec.run_dir)


class WorkerFailed(RuntimeError):
    """A worker exited with an error; the message names the rank and carries its error."""


def spawn(entry: Callable, args: tuple, workers: int, run_dir: str | Path):
    """Run `entry(*args)` on `workers` processes of this node and wait for them; returns rank 0's result.

    `entry` must be a module-level function (it is pickled into each worker)."""
    logs = Path(run_dir) / "logs"
    echo = console.Echo()
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=workers,
        run_id=f"megatron-exp-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        logs_specs=_EchoedLogs(logs, echo),
    )
    # The agent would dump each failed worker's traceback again; it is already on the console and in the logs.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)  # we report signals
    log.info("starting %d worker%s; each one's output is kept under %s", workers, "s" if workers > 1 else "", logs)
    try:
        with echo:
            results = elastic_launch(launch, entry)(*args)
    except SignalException as received:  # this process was signalled; the workers have stopped (or been killed)
        raise stop.Interrupted(received.sigval, *_interrupted_at(run_dir)) from None
    except ChildFailedError as failure:
        _, first = failure.get_first_failure()
        if first.exitcode - 128 in (signal.SIGINT, signal.SIGTERM):  # only the workers were signalled
            raise stop.Interrupted(first.exitcode - 128, *_interrupted_at(run_dir)) from None
        raise WorkerFailed(f"{failures.root_cause(failure, workers)} (logs: {logs})") from None
    return results[0]


class _EchoedLogs(DefaultLogsSpecs):
    """Each rank's stdout and stderr go to its files (logs/<job>/attempt_0/<rank>/), which `echo` shows on this
    console: torch's own tee would put a `[default_role<r>]:` prefix before every line."""

    def __init__(self, log_dir: Path, echo: console.Echo):
        super().__init__(log_dir=str(log_dir), redirects=Std.ALL)
        self.echo = echo

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        files = super().reify(envs)
        for local_rank, env in envs.items():
            self.echo.add(int(env["RANK"]), files.stdouts.get(local_rank), files.stderrs.get(local_rank))
        return files


def _interrupted_at(run_dir: str | Path) -> tuple[int | None, str | None]:
    """(the iteration after which the workers stopped on a signal, the newest checkpoint), as rank 0 recorded them;
    (None, None) if they stopped before training started."""
    path = Path(run_dir) / "interrupted.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record.get("iteration"), record.get("checkpoint")


def init_joined_job(hardware: HardwareConfig, parallel: ParallelConfig) -> None:
    """Join the torchrun job's default process group (needed before ranks can agree on anything)."""
    backend = hardware.backend if hardware.backend != "auto" else None
    state.join(backend, timedelta(seconds=parallel.timeout_s))


def agree_on_run_dir(my_run_dir: str) -> str:
    """Rank 0's run directory for every rank (each torchrun rank composed its own, maybe a second apart)."""
    chosen = [my_run_dir]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != my_run_dir:
        remove_if_only_hydra_files(Path(my_run_dir))
    return chosen[0]


def remove_if_only_hydra_files(path: Path) -> None:
    """Drop a run directory that Hydra created but that will not be used (nothing of ours is in it)."""
    if path.is_dir() and all(p.name in (".hydra", "train.log") for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
