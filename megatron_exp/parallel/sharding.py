"""How each parameter is split across TP ranks, and moving state between the serial model and TP shards.

Every parallel layer tags its parameters with a `ShardSpec`; untagged parameters are replicated. The serial
(TP=1) state dict is the canonical form: `split_state_dict` cuts it into TP=k shards, `merge_state_dicts` puts
shards back together, and initialization draws serial tensors and keeps a shard, so a model's weights never
depend on the TP degree it was built with.

Vocabulary rows are padded to a multiple of 128 x TP (GPT-2's 50,257 becomes 50,304 at TP=1 and 51,200 at TP=8),
so the number of padding rows changes with TP; splitting and merging re-pad them (padding rows are zeros).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from megatron_exp.parallel.state import Group

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Smallest multiple of `multiple * tp_size` that holds the vocabulary."""
    step = multiple * tp_size
    return math.ceil(vocab_size / step) * step


@dataclass(frozen=True)
class ShardSpec:
    """`dim`: the dimension split across TP ranks (None: replicated). `vocab_size`: rows along `dim` are a
    vocabulary of that many real entries, padded per TP degree."""

    dim: int | None = None
    vocab_size: int | None = None

    @classmethod
    def of(cls, param: torch.Tensor) -> ShardSpec:
        return getattr(param, "shard_spec", REPLICATED)

    def tag(self, param: nn.Parameter) -> nn.Parameter:
        param.shard_spec = self
        return param

    def _repad(self, full: torch.Tensor, tp_size: int, name: str) -> torch.Tensor:
        """Pad (with zeros) or trim the vocabulary rows of a full tensor to the padding of `tp_size`."""
        rows = padded_vocab_size(self.vocab_size, tp_size)
        have = full.shape[self.dim]
        if have < self.vocab_size:
            raise ValueError(f"{name}: {have} vocabulary rows, fewer than the vocabulary size {self.vocab_size}")
        if have >= rows:
            return full.narrow(self.dim, 0, rows)
        pad_shape = list(full.shape)
        pad_shape[self.dim] = rows - have
        return torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)

    def shard(self, full: torch.Tensor, tp_size: int, rank: int, name: str = "tensor") -> torch.Tensor:
        """This rank's piece of a serial tensor (padded or not, if it is a vocabulary)."""
        if self.dim is None:
            return full
        if self.vocab_size is not None:
            full = self._repad(full, tp_size, name)
        if full.shape[self.dim] % tp_size:
            raise ValueError(
                f"{name}: dimension {self.dim} of shape {tuple(full.shape)} is not divisible by TP size {tp_size}"
            )
        return full.chunk(tp_size, dim=self.dim)[rank]

    def merge(self, shards: list[torch.Tensor], name: str = "tensor") -> torch.Tensor:
        """The serial tensor (vocabulary padded for TP=1) from every rank's piece, in rank order."""
        if self.dim is None:
            return shards[0]
        full = torch.cat(shards, dim=self.dim)
        if self.vocab_size is not None:
            expected = padded_vocab_size(self.vocab_size, len(shards))
            if full.shape[self.dim] != expected:
                raise ValueError(
                    f"{name}: vocab/padding mismatch: {len(shards)} shards hold {full.shape[self.dim]} rows, but a "
                    f"vocabulary of {self.vocab_size} padded for TP={len(shards)} has {expected}; check that the "
                    "shards come from a model with the same vocab_size and that none is missing"
                )
            full = self._repad(full, 1, name)
        return full

    def serial_shape(self, shard_shape: torch.Size, tp_size: int) -> tuple[int, ...]:
        """Shape of the serial tensor, without vocabulary padding."""
        shape = list(shard_shape)
        if self.dim is not None:
            shape[self.dim] = self.vocab_size if self.vocab_size is not None else shape[self.dim] * tp_size
        return tuple(shape)


REPLICATED = ShardSpec()


def mark_sequence_parallel(param: nn.Parameter) -> nn.Parameter:
    """Tag a replicated parameter that, under sequence parallelism, sees only this rank's sequence shard: its
    gradient is this rank's part of the sum, completed over the TP group (training/grad_sync.py)."""
    param.sequence_parallel = True
    return param


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "sequence_parallel", False)


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Spec of every parameter by state-dict name (tied parameters appear once, under their first name)."""
    return {name: ShardSpec.of(p) for name, p in model.named_parameters()}


def split_state_dict(state: Mapping[str, torch.Tensor], specs: Mapping[str, ShardSpec], tp_size: int) -> list[dict]:
    """Cut a serial state dict into `tp_size` shards, one per TP rank."""
    _check_keys(state.keys(), specs, "serial state dict")
    return [
        {name: specs[name].shard(t, tp_size, rank, name).clone() for name, t in state.items()}
        for rank in range(tp_size)
    ]


def merge_state_dicts(shards: list[Mapping[str, torch.Tensor]], specs: Mapping[str, ShardSpec]) -> dict:
    """Put TP shards (in rank order) back into one serial state dict."""
    for rank, shard in enumerate(shards):
        _check_keys(shard.keys(), specs, f"shard of TP rank {rank}")
    return {name: spec.merge([s[name] for s in shards], name) for name, spec in specs.items()}


def _check_keys(keys, specs: Mapping[str, ShardSpec], what: str) -> None:
    missing, unexpected = set(specs) - set(keys), set(keys) - set(specs)
    if missing or unexpected:
        raise KeyError(f"{what} does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


@torch.no_grad()
def init_normal_shard_(param: torch.Tensor, tp: Group, std: float, generator: torch.Generator) -> None:
    """Draw the whole serial tensor from `generator`, then keep this rank's piece, so that TP=k starts from
    exactly the weights of TP=1 for the same seed. Vocabulary padding rows start at zero."""
    spec = ShardSpec.of(param)
    full = torch.empty(spec.serial_shape(param.shape, tp.size), dtype=param.dtype, device=param.device)
    full.normal_(0.0, std, generator=generator)
    param.copy_(spec.shard(full, tp.size, tp.rank))
