"""The process grid: ranks laid out as (pp, dp, tp) with TP innermost, so a TP group is adjacent ranks
(Megatron's order, Narayanan et al. 2021).

Adjacent ranks share a node (and NVLink on GPUs), which is where the per-layer all-reduces of TP belong;
DP groups stride across TP groups, and PP groups across both (pipeline stages may sit on different nodes: they
exchange one activation per micro-batch). The embedding group joins the first and last stage of a pipeline: both
hold the tied word embedding, and it sums their gradients.

Layers capture the `Group` they are built with, so a serial model and a TP model can live in one process
(tests do this) and nothing in a forward pass looks up global state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """One dimension of the grid as seen by this rank. `handle` is None for size 1 or a virtual grid."""

    size: int = 1
    rank: int = 0
    handle: dist.ProcessGroup | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ProcessGrid:
    tp: Group = Group()
    dp: Group = Group()
    pp: Group = Group()  # its handle carries activations forward; pp_backward carries gradients back
    pp_backward: dist.ProcessGroup | None = field(default=None, compare=False)
    embedding: dist.ProcessGroup | None = field(default=None, compare=False)  # first + last stage, pp > 1
    # Every rank, on gloo whatever the backend: small CPU messages beside the training's collectives (a stop
    # request, who stopped answering). None when there is one rank.
    control: dist.ProcessGroup | None = field(default=None, compare=False)

    @property
    def world_size(self) -> int:
        return self.tp.size * self.dp.size * self.pp.size

    @property
    def rank(self) -> int:
        return (self.pp.rank * self.dp.size + self.dp.rank) * self.tp.size + self.tp.rank


SERIAL = ProcessGrid()
_current: ProcessGrid = SERIAL


def current() -> ProcessGrid:
    """The grid that layers use when none is passed: SERIAL until `initialize` is called."""
    return _current


def grid_coordinates(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank; TP varies fastest."""
    return rank // (tp * dp), (rank // tp) % dp, rank % tp


def group_members(world_size: int, tp: int, pp: int = 1) -> dict[str, list[list[int]]]:
    """Every TP, DP and PP group of a grid as lists of global ranks."""
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    dp = world_size // (tp * pp)
    ranks = torch.arange(world_size).reshape(pp, dp, tp)
    pipelines = ranks.permute(1, 2, 0).reshape(-1, pp)
    return {
        "tp": ranks.reshape(-1, tp).tolist(),
        "dp": ranks.permute(0, 2, 1).reshape(-1, dp).tolist(),
        "pp": pipelines.tolist(),
        "embedding": pipelines[:, [0, -1]].tolist() if pp > 1 else [],
    }


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def join(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> None:
    """Join the job's default process group (torchrun-style environment variables), on this rank's GPU for NCCL."""
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout)


def initialize(
    tp: int,
    pp: int = 1,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
) -> ProcessGrid:
    """Join the default process group (from torchrun-style env vars) if needed and build this rank's grid.

    Every rank creates every group, in the same order, as torch.distributed requires.
    """
    global _current
    if not dist.is_initialized():
        join(backend, timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    members = group_members(world, tp, pp)
    dims, handles = {}, {}
    for name, groups in members.items():
        for ranks in groups:
            handle = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            backward = dist.new_group(ranks, timeout=timeout) if name == "pp" and len(ranks) > 1 else None
            if rank in ranks:
                dims[name] = Group(len(ranks), ranks.index(rank), handle)
                handles[name] = handle, backward
    control = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    embedding = dims.pop("embedding", Group()).handle
    _current = ProcessGrid(**dims, pp_backward=handles["pp"][1], embedding=embedding, control=control)
    return _current


def destroy() -> None:
    """Tear down the grid and the default process group; safe to call twice."""
    global _current
    _current = SERIAL
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def use(grid: ProcessGrid) -> Iterator[ProcessGrid]:
    """Make `grid` current for the block: build a serial reference model, or a shard on a virtual grid."""
    global _current
    previous, _current = _current, grid
    try:
        yield grid
    finally:
        _current = previous


def virtual(tp: int, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0) -> ProcessGrid:
    """A grid with no process groups: enough to build (not run) one rank's shard, e.g. on the meta device."""
    return ProcessGrid(tp=Group(tp, tp_rank), pp=Group(pp, pp_rank))
