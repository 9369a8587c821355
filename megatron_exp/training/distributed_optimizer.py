"""The distributed optimizer (ZeRO stage 1): Adam's state sharded over the DP group.

A rank's parameters (its TP shard of its pipeline stage's) live in one flat buffer, decayed parameters first (the
plain optimizer's order), padded to a multiple of dp; DP rank r owns the r-th contiguous 1/dp of it. One step:

1. (GradientSync) the tied embedding's sum over the pipeline's embedding group, then a reduce-scatter of the flat
   gradient buffer over DP: each rank gets the DP mean of its slice;
2. fp16: unscale the slice and look for inf/nan; every rank agrees on the overflow (DynamicLossScaler);
3. the global gradient norm from every rank's slice, summed over DP, TP and the stages with the plain optimizer's
   rule (optim.squared_norm: TP-replicated parameters and the tied embedding's copy counted once); clip;
4. AdamW (build_optimizer's settings) on the slice only, so each rank keeps 1/dp of the moments;
5. all-gather the updated slices into every replica's parameters.

Parameters and gradients are views into the flat buffers, so backward accumulates into the gradient buffer in
place, the reduce-scatter writes each rank's slice in place (NCCL documents this in-place form; gloo computes it
the same, tested) and the all-gather writes the parameters directly: no copies, no second gradient buffer. With
fp32 parameters the slice's main weights are views of the parameter buffer: 4 + 4 + 8/dp bytes per parameter.
With low-precision parameters (`dtype`, training/mixed_precision.py) the parameter buffer is bf16/fp16, the
gradient buffer stays fp32 (main gradients, which backward hooks accumulate into), and `main` holds fp32 copies
of the slice, stepped here and cast into the parameter buffer before the all-gather: 2 + 4 + 12/dp bytes.

A rank's checkpoint holds its slice's moments with the flat layout (every parameter's name and shape, the slice's
range), so `merged_state` joins the slices of any DP degree into the plain AdamW state of one (stage, TP rank)
position, which a plain optimizer loads and `DistributedOptimizer.load_state_dict` cuts again at any DP degree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_exp.config import OptimizerConfig
from megatron_exp.parallel.mappings import all_reduce_
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training import checkpoint
from megatron_exp.training.mixed_precision import accumulate_in_main_grad, state_with_main_weights
from megatron_exp.training.optim import DynamicLossScaler, decayed, squared_norm

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_shard(state: dict) -> bool:
    """Whether an optimizer state dict is one DP rank's slice (else it is a plain AdamW state dict)."""
    return "flat_range" in state


class DistributedOptimizer:
    def __init__(self, model: nn.Module, cfg: OptimizerConfig, grid: ProcessGrid, dtype: torch.dtype | None = None):
        """`dtype`: the parameters' dtype where it is lower than the one the model was built in (which the
        gradient buffer and the main weights keep); None: the parameters are their own main weights."""
        self.model, self.grid = model, grid
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        named = [(n, p) for n, p in named if decayed(p)] + [(n, p) for n, p in named if not decayed(p)]
        self.layout = [[name, list(p.shape)] for name, p in named]  # the flat order, saved with every slice
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(
                f"the distributed optimizer keeps one flat buffer per rank, but the parameters are {dtypes}"
            )
        self.numel = sum(p.numel() for _, p in named)
        self.slice_numel = math.ceil(self.numel / grid.dp.size)
        padding = named[0][1].new_zeros(self.slice_numel * grid.dp.size - self.numel)
        self.params = torch.cat([*(p.detach().reshape(-1) for _, p in named), padding])
        self.grads = torch.zeros_like(self.params)
        self.start = grid.dp.rank * self.slice_numel
        self.end = min(self.start + self.slice_numel, self.numel)  # the last slice may end in padding
        self.cast = dtype is not None and dtype != self.params.dtype

        # Main weights: the slice cut at the boundary between decayed and not decayed parameters (a piece may be
        # empty: the slice is then one group's); copies where the parameters are cast, else views.
        self.decayed = sum(decayed(p) for _, p in named)
        boundary = sum(p.numel() for _, p in named if decayed(p))
        self.main, self.ranges, groups = [], [], []
        for (lo, hi), weight_decay in (((self.start, min(self.end, boundary)), cfg.weight_decay),
                                       ((max(self.start, boundary), self.end), 0.0)):  # fmt: skip
            pieces = [self.params[lo:hi].clone() if self.cast else self.params[lo:hi]] if lo < hi else []
            for piece in pieces:
                piece.grad = self.grads[lo:hi]
                self.ranges.append((lo, hi))
            self.main += pieces
            groups.append({"params": pieces, "weight_decay": weight_decay})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        if self.cast:
            self.params = self.params.to(dtype)

        # The module keeps its Parameters; their storage is now the buffer's, and their gradients (or main
        # gradients) the gradient buffer's. Each parameter's part of the slice, for the norm (its parameter says
        # whether and where it counts).
        self.norm_pieces, offset = [], 0
        with torch.no_grad():
            for _, p in named:
                p.data = self.params[offset : offset + p.numel()].view_as(p)
                grad = self.grads[offset : offset + p.numel()].view_as(p)
                if self.cast:
                    accumulate_in_main_grad(p, grad)
                else:
                    p.grad = grad
                lo, hi = max(offset, self.start), min(offset + p.numel(), self.end)
                if lo < hi:
                    self.norm_pieces.append((p, self.grads[lo:hi]))
                offset += p.numel()

    @property
    def param_groups(self) -> list[dict]:
        """The slice's AdamW groups (the loop sets their learning rate)."""
        return self.optimizer.param_groups

    def step(self, clip_grad: float, scaler: DynamicLossScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """After GradientSync(model, grid, optimizer.grads): unscale (fp16), clip, step the slice (cast into the
        parameters where they are low-precision), all-gather, zero the gradients. Returns what
        optim.optimizer_step does: the global gradient norm (0.0 for a skipped step) and 1.0 where an fp16
        overflow skipped the step, else 0.0, both on the device."""
        dp = self.grid.dp
        skipped = scaler.unscale_(self.main) if scaler else torch.zeros((), device=self.params.device)
        squares = squared_norm(self.norm_pieces, self.grid)
        norm = all_reduce_(all_reduce_(all_reduce_(squares, dp), self.grid.tp), self.grid.pp).sqrt()
        if clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(self.main, clip_grad, norm)
        if scaler:
            scaler.step(self.optimizer, skipped)
        else:
            self.optimizer.step()
        if self.cast:
            for piece, (lo, hi) in zip(self.main, self.ranges, strict=True):
                self.params[lo:hi].copy_(piece)
        if dp.size > 1:
            dist.all_gather_single(
                self.params, self.params[self.start : self.start + self.slice_numel], group=dp.handle
            )
        self.grads.zero_()
        return torch.where(skipped > 0, 0.0, norm), skipped

    # --- checkpoints -------------------------------------------------------------------------------------------

    def main_state_dict(self) -> dict:
        """The model's state dict with the main weights for its parameters (what a checkpoint saves): every DP
        rank's slice of them, all-gathered (a collective: every DP rank calls it)."""
        dp = self.grid.dp
        own = self.main[0].new_zeros(self.slice_numel)
        own[: self.end - self.start] = torch.cat([piece.detach() for piece in self.main])
        flat = own.new_empty(self.slice_numel * dp.size)
        if dp.size > 1:
            dist.all_gather_single(flat, own, group=dp.handle)
        else:
            flat.copy_(own)
        sizes = [math.prod(shape) for _, shape in self.layout]
        pieces = flat[: self.numel].split(sizes)
        main = {name: piece.view(shape) for (name, shape), piece in zip(self.layout, pieces, strict=True)}
        return state_with_main_weights(self.model, main)

    def load_main_weights(self, state: dict) -> None:
        """Set this rank's slice of the main weights from a model state dict (the parameters were loaded from it:
        they are its cast)."""
        flat = torch.cat([state[name].reshape(-1) for name, _ in self.layout])
        with torch.no_grad():
            for piece, (lo, hi) in zip(self.main, self.ranges, strict=True):
                piece.copy_(flat[lo:hi])

    def state_dict(self) -> dict:
        """This rank's slice: its moments as flat tensors over `flat_range`, the step count, the groups'
        hyperparameters and the flat layout (parameter names and shapes in order, the first `decayed` of them in
        the decayed group)."""
        state = self.optimizer.state
        saved = {
            "layout": self.layout,
            "decayed": self.decayed,
            "flat_range": [self.start, self.end],
            "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
        }
        if state:  # after the first step
            saved["step"] = state[self.main[0]]["step"].clone()
            saved |= {key: torch.cat([state[piece][key] for piece in self.main]) for key in MOMENTS}
        return saved

    def load_state_dict(self, saved: dict) -> None:
        """Load this rank's own slice (saved at this DP degree) or cut it from a plain AdamW state dict of this
        (stage, TP rank) position (saved without the distributed optimizer, or `merged_state`)."""
        if is_shard(saved):
            if saved["layout"] != self.layout or saved["flat_range"] != [self.start, self.end]:
                raise ValueError(
                    f"the slice covers elements {saved['flat_range']} of another flat layout, not this rank's "
                    f"[{self.start}, {self.end}): saved at another DP degree or model shard (use merged_state)"
                )
            flat, step = ({key: saved[key] for key in MOMENTS}, saved["step"]) if "step" in saved else (None, None)
        else:
            flat, step = self._cut(saved)
        groups = [{**hyper, "params": []} for hyper in saved["param_groups"]]
        state, index, offset = {}, 0, 0
        for group, own in zip(groups, self.param_groups, strict=True):
            for piece in own["params"]:
                group["params"].append(index)
                if flat is not None:
                    state[index] = {"step": step.clone()}
                    state[index] |= {key: flat[key][offset : offset + piece.numel()].clone() for key in MOMENTS}
                index, offset = index + 1, offset + piece.numel()
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _cut(self, plain: dict) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """This rank's slice of a plain AdamW state dict's moments (None before its first step)."""
        indices = [i for group in plain["param_groups"] for i in group["params"]]
        if len(indices) != len(self.layout):
            raise ValueError(f"the optimizer state has {len(indices)} parameters, this model shard {len(self.layout)}")
        if not plain["state"]:
            return None, None
        entries = [plain["state"][i] for i in indices]
        if [list(e["exp_avg"].shape) for e in entries] != [shape for _, shape in self.layout]:
            raise ValueError("the optimizer state's moments have other shapes than this model shard's parameters")
        flat = {key: torch.cat([e[key].reshape(-1) for e in entries])[self.start : self.end] for key in MOMENTS}
        return flat, entries[0]["step"]


class JoinedSlices:
    """Every DP rank's optimizer slice of one (stage, TP rank) position, checked to tile its flat layout; a
    parameter's moments are read from the slices that hold it, one parameter at a time."""

    def __init__(self, slices: list[dict], files: list[Path], position: str):
        first = slices[0]
        self.layout, self.decayed, self.param_groups = first["layout"], first["decayed"], first["param_groups"]
        self.step = first.get("step")
        self.offsets = [0, *itertools.accumulate(math.prod(shape) for _, shape in self.layout)]
        end = 0
        for part, path in zip(slices, files, strict=True):
            if part["layout"] != self.layout or part["flat_range"][0] != end:
                raise checkpoint.CheckpointError(
                    f"{path}: its optimizer slice starts at element {part['flat_range'][0]} of its flat layout, not "
                    f"at {end} where the previous DP rank's ended: the checkpoint mixes runs; use another checkpoint"
                )
            end = part["flat_range"][1]
        if end != self.offsets[-1]:
            raise checkpoint.CheckpointError(f"the optimizer slices of {position} end at {end} of {self.offsets[-1]}")
        self.slices = slices

    def moment(self, index: int, key: str) -> torch.Tensor:
        """Parameter `index`'s (flat order) moment `key` in the parameter's shape."""
        lo, hi = self.offsets[index], self.offsets[index + 1]
        pieces = []
        for part in self.slices:
            start, end = part["flat_range"]
            if start < hi and lo < end:
                pieces.append(part[key][max(lo, start) - start : min(hi, end) - start])
        return torch.cat(pieces).view(self.layout[index][1])

    def plain_state(self) -> dict:
        """The plain AdamW state dict of the position."""
        indices = [list(range(self.decayed)), list(range(self.decayed, len(self.layout)))]
        groups = [{**hyper, "params": ids} for hyper, ids in zip(self.param_groups, indices, strict=True)]
        entries = {}
        if self.step is not None:
            for index in range(len(self.layout)):
                entries[index] = {"step": self.step.clone()} | {key: self.moment(index, key) for key in MOMENTS}
        return {"state": entries, "param_groups": groups}


def position_state(
    directory: Path, stage: int, tp_rank: int, read: Callable[[int], dict] | None = None
) -> dict | JoinedSlices:
    """The saved optimizer state of one (pipeline stage, TP rank) position: DP replica 0's plain AdamW state, or
    the joined slices of every DP rank. `read(rank)`: a rank's saved state (default: checkpoint.load_rank)."""
    meta = checkpoint.read_meta(directory)
    read = read or (lambda rank: checkpoint.load_rank(directory, rank))
    ranks = [(stage * meta["dp"] + d) * meta["tp"] + tp_rank for d in range(meta["dp"])]
    first = read(ranks[0])["optimizer"]
    if not is_shard(first):
        return first
    slices = [first, *(read(rank)["optimizer"] for rank in ranks[1:])]
    files = [checkpoint.rank_file(directory, rank) for rank in ranks]
    return JoinedSlices(slices, files, f"stage {stage}, TP rank {tp_rank} in {directory}")


def merged_state(directory: Path, stage: int, tp_rank: int) -> dict:
    """The plain AdamW state dict of one (pipeline stage, TP rank) position of a checkpoint, whatever saved it:
    DP replica 0's own state, or every DP rank's slice joined and split into the parameters' shapes."""
    saved = position_state(directory, stage, tp_rank)
    return saved.plain_state() if isinstance(saved, JoinedSlices) else saved
