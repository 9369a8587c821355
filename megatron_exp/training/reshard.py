"""A training checkpoint carried to another layout: resume at any TP x PP x DP degree.

The canonical form of the training state is serial, as for the weights: every Adam moment has its parameter's
shape and so its parameter's shard spec, and merges and re-splits the same way. A DP replica holds the same state
as the others, so replica 0 is read. The tied word embedding's copy on the last pipeline stage takes the same
steps as the first stage's and is not read; the new layout's last stage gets the first stage's state.

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

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from megatron_exp.models import build_model
from megatron_exp.parallel import random, state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import merge_state_dicts, shard_specs
from megatron_exp.parallel.state import Group, ProcessGrid
from megatron_exp.training import checkpoint
from megatron_exp.training.distributed_optimizer import is_shard, merged_state
from megatron_exp.training.optim import optimizer_groups, optimizer_order

MOMENTS = ("exp_avg", "exp_avg_sq")


def _stage_optimizer_states(directory: Path, stage: int, part_model: nn.Module) -> dict[str, dict]:
    """The serial Adam state of one saved stage's parameters, by name: its TP ranks' moments merged."""
    meta = checkpoint.read_meta(directory)
    names = optimizer_order(part_model)
    specs = shard_specs(part_model)
    shards = []
    for tp_rank, rank in enumerate(checkpoint.stage_ranks(meta, stage)):
        saved = checkpoint.load_rank(directory, rank)["optimizer"]
        shards.append((merged_state(directory, stage, tp_rank) if is_shard(saved) else saved)["state"])
    merged = {}
    for key in MOMENTS:
        per_rank = [{names[index]: entry[key] for index, entry in shard.items()} for shard in shards]
        for name, tensor in merge_state_dicts(per_rank, {n: specs[n] for n in per_rank[0]}).items():
            merged.setdefault(name, {})[key] = tensor
    for index, entry in shards[0].items():
        merged[names[index]]["step"] = entry["step"]
    return merged


def serial_optimizer_state(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's state of the whole model as if trained serially: {parameter name: {step, exp_avg, exp_avg_sq}}."""
    meta = checkpoint.read_meta(directory)
    tp, pp, virtual = checkpoint.layout_of(meta)
    cfg = checkpoint.model_config_of(directory)
    layout = PipelineLayout(pp, virtual, cfg.layers)
    serial: dict[str, dict] = {}
    for stage in range(pp):
        with torch.device("meta"), state.use(state.virtual(tp, pp=pp, pp_rank=stage)):
            part_model = build_model(cfg, part=layout.part(stage))
        for name, entry in _stage_optimizer_states(directory, stage, part_model).items():
            serial.setdefault(name, entry)  # the first stage's word embedding, not the last stage's copy
    return serial


def param_groups_for(model: nn.Module, template: list[dict]) -> list[dict]:
    """The optimizer's param_groups entry for `model` (this rank's parameters), hyperparameters from `template`
    (any rank's saved groups: decayed, then not decayed)."""
    decayed, rest = optimizer_groups(model)
    indices = [range(len(decayed)), range(len(decayed), len(decayed) + len(rest))]
    return [{**group, "params": list(ids)} for group, ids in zip(template, indices, strict=True)]


def shard_optimizer_state(
    serial: dict[str, dict[str, torch.Tensor]], model: nn.Module, tp: Group, param_groups: list[dict]
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


def replicated_stream(
    meta: dict, saved_rng: Callable[[int], dict | None], pp: int, virtual: int, stage: int
) -> dict | None:
    """The saved replicated dropout stream for `stage` of a (pp, virtual) layout, as a partial RNG state (no
    TP-region stream), or None where the checkpoint's stages are other ones. `saved_rng(rank)`: a rank's saved RNG."""
    if checkpoint.layout_of(meta)[1:] != (pp, virtual):
        return None
    rng = saved_rng(checkpoint.stage_ranks(meta, stage)[0])
    return None if rng is None else {**rng, "tp_region": None}
