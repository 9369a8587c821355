"""Tensor-parallel layers: each holds one TP rank's slice of a serial layer's weights.

ColumnParallelLinear splits the output features (Y = X [A_1 ... A_k], no communication but f on the input);
RowParallelLinear splits the input features (Y = sum_i X_i A_i, reduced by g); a column layer followed by a row
layer therefore needs one f and one g, which is how the paper parallelizes both the MLP and attention.
With `sequence_parallel`, f_sp and g_sp take their places: the column layer reads sequence shards, the row layer
and the embedding write them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exp.parallel import state
from megatron_exp.parallel.mappings import f_linear, g, g_sp, gather_last_dim, split_last_dim
from megatron_exp.parallel.sharding import ShardSpec, init_normal_shard_, mark_sequence_parallel, padded_vocab_size
from megatron_exp.parallel.state import Group


def _divide(total: int, tp: Group, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{what}={total} is not divisible by the tensor-parallel size {tp.size}")
    return total // tp.size


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's rows (output features) split across TP ranks.

    The output is this rank's slice of features unless `gather_output` is set. With `sequence_parallel` the
    input is this rank's sequence shard, all-gathered (f_sp) inside the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = False,
        init_std: float = 0.02,
        tp: Group | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp = tp or state.current().tp
        self.gather_output, self.init_std, self.sequence_parallel = gather_output, init_std, sequence_parallel
        local_out = _divide(out_features, self.tp, "out_features")
        self.weight = ShardSpec(dim=0).tag(nn.Parameter(torch.empty(local_out, in_features)))
        self.bias = ShardSpec(dim=0).tag(nn.Parameter(torch.empty(local_out))) if bias else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_shard_(self.weight, self.tp, self.init_std, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = f_linear(x, self.weight, self.bias, self.tp, self.sequence_parallel)
        return gather_last_dim(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's columns (input features) split across TP ranks; partial sums reduced by g.

    The bias is replicated and added once, after the reduction. With `input_is_parallel` (the usual case, after a
    ColumnParallelLinear) x is already this rank's slice; otherwise it is split here. With `sequence_parallel`
    the reduction is g_sp's reduce-scatter and the bias is added to this rank's sequence shard (so its gradient
    is partial: tagged for the TP sum).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_std: float = 0.02,
        tp: Group | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp = tp or state.current().tp
        self.input_is_parallel, self.init_std = input_is_parallel, init_std
        self.sequence_parallel = sequence_parallel and self.tp.size > 1
        local_in = _divide(in_features, self.tp, "in_features")
        self.weight = ShardSpec(dim=1).tag(nn.Parameter(torch.empty(out_features, local_in)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None and self.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_shard_(self.weight, self.tp, self.init_std, generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = split_last_dim(x, self.tp)
        if self.tp.size == 1:  # nothing to reduce: the matmul adds the bias itself (one addmm, no extra pass)
            return F.linear(x, self.weight, self.bias)
        y = (g_sp if self.sequence_parallel else g)(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across TP ranks.

    The vocabulary is padded to a multiple of 128 x TP. Each rank looks up the ids in its row range, writes zeros
    for the others, and g sums the partial lookups (with `sequence_parallel`, g_sp: each rank keeps its sequence
    shard of the sum). The weight doubles as the (tied) output layer.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        init_std: float = 0.02,
        tp: Group | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp = tp or state.current().tp
        self.vocab_size, self.init_std, self.sequence_parallel = vocab_size, init_std, sequence_parallel
        self.padded_vocab_size = padded_vocab_size(vocab_size, self.tp.size)
        rows = self.padded_vocab_size // self.tp.size
        self.vocab_start = self.tp.rank * rows
        self.weight = ShardSpec(dim=0, vocab_size=vocab_size).tag(nn.Parameter(torch.empty(rows, dim)))

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_normal_shard_(self.weight, self.tp, self.init_std, generator)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        reduce = g_sp if self.sequence_parallel else g
        return reduce(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)
