"""A training checkpoint carried to another layout: resume at any TP x PP x DP degree.

The canonical form of the training state is serial, as for the weights: every Adam moment has its parameter's
shape and so its parameter's shard spec, and merges and re-splits the same way. A DP replica holds the same state
as the others, so replica 0 is read (with the distributed optimizer, every DP rank's slice of it). A rank reads
only its own parameters' pieces, one parameter at a time (checkpoint.SavedShards). The tied word embedding's
copy on the last pipeline stage takes the same steps as the first stage's and is not read; the new layout's last
stage gets the first stage's state.

The dropout streams (parallel/random.py) carry over as far as they mean the same thing at the new layout. The
replicated stream (dropout on activations every TP rank holds whole: embeddings, residual branches) is one per
pipeline stage, the same on every TP rank and DP replica of it; with the same stages (pp and virtual_stages as
saved) every new rank continues its stage's stream, so at another TP degree those masks are the uninterrupted
run's. The TP-region streams (attention probabilities, sequence-parallel shards) belong to a TP rank's slice of
the data, which a new TP degree cuts differently; they, and every stream where the stages change, are re-derived
from the seed, the iteration and the rank's place (`reseed`). Masks also differ at another DP degree, where each
replica draws for a different share of the micro-batches. With dropout off the continued run is the same run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from megatron_exp.parallel import random
from megatron_exp.parallel.sharding import shard_specs
from megatron_exp.parallel.state import Group, ProcessGrid
from megatron_exp.training import checkpoint
from megatron_exp.training.checkpoint import SavedShards
from megatron_exp.training.distributed_optimizer import JoinedSlices, position_state
from megatron_exp.training.optim import optimizer_groups, optimizer_order

MOMENTS = ("exp_avg", "exp_avg_sq")


class SavedAdam(Mapping):
    """Adam's state of a checkpoint as if trained serially, {parameter name: {step, exp_avg, exp_avg_sq}}, merged
    from the saved stage's TP positions (plain or distributed-optimizer slices) when a parameter is looked up."""

    def __init__(self, saved: checkpoint.SavedShards):
        self.saved = saved
        self.index = [{name: i for i, name in enumerate(optimizer_order(part))} for part in saved.parts]
        self._positions: dict[int, list] = {}

    def _positions_of(self, stage: int) -> list:
        if stage not in self._positions:
            read, tp = self.saved.rank_state, self.saved.meta["tp"]
            self._positions[stage] = [position_state(self.saved.directory, stage, t, read) for t in range(tp)]
        return self._positions[stage]

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        stage = self.saved.stage_of[name]
        index, positions = self.index[stage][name], self._positions_of(stage)
        spec = self.saved.specs[stage][name]
        first = positions[0]
        step = first.step if isinstance(first, JoinedSlices) else first["state"][index]["step"]
        pieces = {key: [_moment(position, index, key) for position in positions] for key in MOMENTS}
        return {"step": step} | {key: spec.merge(tensors, name) for key, tensors in pieces.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.saved.stage_of)

    def __len__(self) -> int:
        return len(self.saved.stage_of)


def _moment(position: dict | JoinedSlices, index: int, key: str) -> torch.Tensor:
    return position.moment(index, key) if isinstance(position, JoinedSlices) else position["state"][index][key]


def serial_optimizer_state(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's state of the whole model as if trained serially: {parameter name: {step, exp_avg, exp_avg_sq}}."""
    return {
        name: {key: t.clone() for key, t in entry.items()} for name, entry in SavedAdam(SavedShards(directory)).items()
    }


def param_groups_for(model: nn.Module, template: list[dict]) -> list[dict]:
    """The optimizer's param_groups entry for `model` (this rank's parameters), hyperparameters from `template`
    (any rank's saved groups: decayed, then not decayed)."""
    decayed, rest = optimizer_groups(model)
    indices = [range(len(decayed)), range(len(decayed), len(decayed) + len(rest))]
    return [{**group, "params": list(ids)} for group, ids in zip(template, indices, strict=True)]


def shard_optimizer_state(
    serial: Mapping[str, dict[str, torch.Tensor]], model: nn.Module, tp: Group, param_groups: list[dict]
) -> dict:
    """The optimizer state_dict of `model` (one rank's TP shard of its stage): the serial moments of its
    parameters, cut to its TP shard."""
    specs = shard_specs(model)
    entries = {}
    for index, name in enumerate(optimizer_order(model)):
        entry = serial[name]
        entries[index] = {"step": entry["step"].clone()} | {
            key: specs[name].shard(entry[key], tp.size, tp.rank, name).clone() for key in MOMENTS
        }
    return {"state": entries, "param_groups": param_groups_for(model, param_groups)}


def reseed(seed: int, iteration: int, grid: ProcessGrid, device: torch.device) -> None:
    """Dropout streams for a run continued at another layout, a function of where it continues."""
    random.seed(seed + 7919 * iteration, grid.tp.rank, device, stage=grid.pp.rank)


def replicated_stream(saved: SavedShards, pp: int, virtual: int, stage: int) -> dict | None:
    """The saved replicated dropout stream for `stage` of a (pp, virtual) layout, as a partial RNG state (no
    TP-region stream), or None where the checkpoint's stages are other ones."""
    if checkpoint.layout_of(saved.meta)[1:] != (pp, virtual):
        return None
    rng = saved.rank_state(checkpoint.stage_ranks(saved.meta, stage)[0])["rng"]
    return None if rng is None else {**rng, "tp_region": None}
