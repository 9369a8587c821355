"""Dropout randomness under TP, and recomputation (parallel.recompute) that reproduces it.

Outside TP regions activations are replicated, so every TP rank must draw the same dropout mask: the default
generator is seeded identically on all TP ranks. Inside a TP region (attention probabilities, split by head)
each rank holds different data and must draw an independent mask: that uses a second stream, seeded per TP
rank, swapped in with `tp_region()`. Sequence parallelism's shards (the residual stream split along the sequence)
are such data too, so their dropouts draw from the same stream. Recomputing a layer (or its attention core) in
backward restores both streams as they were in forward, so recomputed masks equal the original ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.utils.checkpoint

PIPELINE_STAGE_SEED_OFFSET = 100  # per pipeline stage, on both streams (as Megatron)
# Offset between the replicated stream's seed and the TP-region streams' seeds (Megatron uses the same).
TP_REGION_SEED_OFFSET = 2718


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, rng_state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng_state, device)
    else:
        torch.set_rng_state(rng_state)


class _TPRegionStream:
    """The per-TP-rank generator state, kept while the default generator runs the replicated stream."""

    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.rng_state: torch.Tensor | None = None

    def seed(self, seed: int, device: torch.device) -> None:
        outer = _get_state(device)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.device, self.rng_state = device, _get_state(device)
        _set_state(device, outer)

    @contextmanager
    def active(self) -> Iterator[None]:
        if self.rng_state is None:
            raise RuntimeError("dropout inside a TP region needs megatron_exp.parallel.random.seed(...) first")
        outer = _get_state(self.device)
        _set_state(self.device, self.rng_state)
        try:
            yield
        finally:
            self.rng_state = _get_state(self.device)
            _set_state(self.device, outer)


_stream = _TPRegionStream()


def seed(seed: int, tp_rank: int, device: torch.device | str = "cpu", stage: int = 0) -> None:
    """Seed the replicated stream with `seed` (same on all TP ranks) and the TP-region stream per TP rank; each
    pipeline stage offsets both, so its layers do not draw the dropout masks of another stage's layers."""
    seed += PIPELINE_STAGE_SEED_OFFSET * stage
    device = torch.device(device)
    torch.manual_seed(seed)  # seeds CPU and every CUDA device
    _stream.seed(seed + TP_REGION_SEED_OFFSET + tp_rank, device)


def tp_region() -> AbstractContextManager[None]:
    """Run the block on this TP rank's own stream (for dropout on TP-split activations)."""
    return _stream.active()


def get_tp_region_state() -> torch.Tensor | None:
    return None if _stream.rng_state is None else _stream.rng_state.clone()


def set_tp_region_state(rng_state: torch.Tensor, device: torch.device | str = "cpu") -> None:
    _stream.device, _stream.rng_state = torch.device(device), rng_state.clone()


def get_rng_state(device: torch.device | str = "cpu") -> dict:
    """Both streams of this rank, for a checkpoint."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "tp_region": get_tp_region_state()}


def set_rng_state(rng: dict, device: torch.device | str = "cpu") -> None:
    """Both streams, or only the replicated one where `rng` has no TP-region stream (tp_region=None)."""
    device = torch.device(device)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    if rng["tp_region"] is not None:
        set_tp_region_state(rng["tp_region"], device)


def _restore_tp_region_on_recompute():
    """For torch's checkpoint: remember the TP-region stream at forward, replay it during recompute."""
    at_forward = get_tp_region_state()

    @contextmanager
    def recompute() -> Iterator[None]:
        if at_forward is None:
            yield
            return
        after_forward = _stream.rng_state
        _stream.rng_state = at_forward
        try:
            yield
        finally:
            _stream.rng_state = after_forward

    return nullcontext(), recompute()


def checkpoint(function, *args):
    """Run `function(*args)` without keeping its activations; backward recomputes it with the same dropout masks.

    torch restores the replicated stream (preserve_rng_state); the context restores the TP-region stream. That
    replay swaps generator states, which dynamo cannot trace, so under a compiled layer (selective recomputation
    with train.compile) the layer's graph breaks around this call and the recomputed region runs eagerly
    (`run_checkpoint_eagerly`).
    """
    return _checkpoint(function, *args)


def _replaying_checkpoint(function, *args):
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_restore_tp_region_on_recompute
    )


_checkpoint = _replaying_checkpoint


def run_checkpoint_eagerly() -> None:
    """Hide `checkpoint`'s replay from dynamo: called before layers are compiled. Not done at import, since
    torch.compiler.disable imports dynamo, which adds ~1 s to the start of every process that imports the models
    (the launching process of every job among them) and ~0.5 s to its exit."""
    global _checkpoint
    _checkpoint = torch.compiler.disable(_replaying_checkpoint)
