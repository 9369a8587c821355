"""Gradients that ranks share, made whole after a step's backward passes.

- Data parallelism: every DP replica computed gradients on its own share of the global batch; they are
  averaged, in flattened buckets (one all-reduce each, not one per parameter). With the distributed optimizer
  (training/distributed_optimizer.py) the gradients already lie in one flat buffer, and its reduce-scatter gives
  each DP rank the mean of only the slice it steps.
- Pipeline parallelism: the word embedding is used by the first stage (input) and the last (tied output layer);
  each holds a copy, and the embedding group sums their gradients so the copies take the same step.
- Sequence parallelism: replicated parameters applied to sequence shards (layernorms, row-parallel biases,
  position embeddings: tagged by `mark_sequence_parallel`) hold this TP rank's part of their gradient; the TP
  group sums them first, so the replicas stay equal and the gradient norm (which counts a replicated parameter
  once) and the DP reduction see whole gradients.

With low-precision parameters (training/mixed_precision.py) every reduction acts on the fp32 main gradients.

The schedule runs all micro-batches first (a pipeline's last backward differs per stage), so the reduction comes
after, not overlapped with, backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_exp.parallel.sharding import is_sequence_parallel
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training.mixed_precision import gradient

BUCKET_BYTES = 25 * 2**20


def tied_embedding(model: nn.Module) -> nn.Parameter | None:
    """The word embedding of a stage that holds it as a pipeline's first or last stage (None elsewhere)."""
    embedding = getattr(model, "embedding", None)
    return None if embedding is None else embedding.weight


class GradientSync:
    def __init__(self, model: nn.Module, grid: ProcessGrid, flat: torch.Tensor | None = None):
        """`flat`: the distributed optimizer's gradient buffer (every parameter's gradient a view into it, its
        length a multiple of dp): DP rank r gets the mean of its r-th 1/dp of it, in place, instead of every
        gradient's mean."""
        self.grid, self.flat = grid, flat
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.embedding = tied_embedding(model) if grid.pp.size > 1 else None
        self.sequence_parallel = [p for p in self.parameters if is_sequence_parallel(p)] if grid.tp.size > 1 else []

    def __call__(self) -> None:
        self._sum_over_tp()
        if self.flat is None:
            self._all_reduce_over_dp()
            self._sum_embedding()
        else:
            self._sum_embedding()  # first: the two stages lay out their flat buffers differently
            self._reduce_scatter_over_dp()

    def _sum_embedding(self) -> None:
        grad = None if self.embedding is None else gradient(self.embedding)
        if grad is not None:
            dist.all_reduce(grad, group=self.grid.embedding)

    def _reduce_scatter_over_dp(self) -> None:
        dp = self.grid.dp
        if dp.size > 1:
            own = self.flat.view(dp.size, -1)[dp.rank]
            dist.reduce_scatter_single(own, self.flat, group=dp.handle)
            own /= dp.size

    def _sum_over_tp(self) -> None:
        for bucket in _buckets(self.sequence_parallel):
            _all_reduce_bucket(bucket, self.grid.tp.handle)

    def _all_reduce_over_dp(self) -> None:
        if self.grid.dp.size > 1:
            for bucket in _buckets(self.parameters):
                _all_reduce_bucket(bucket, self.grid.dp.handle, divide=self.grid.dp.size)


def _all_reduce_bucket(bucket: list[torch.Tensor], group: dist.ProcessGroup, divide: int = 1) -> None:
    """Sum (then divide) the gradients of a bucket over `group` with one all-reduce, in place."""
    flat = _flatten_dense_tensors(bucket)
    dist.all_reduce(flat, group=group)
    if divide > 1:
        flat /= divide
    for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
        grad.copy_(reduced)


def _buckets(parameters: list[nn.Parameter]) -> list[list[torch.Tensor]]:
    """The parameters' gradients (main gradients where they have them) in groups of up to BUCKET_BYTES of one dtype."""
    buckets, current, size = [], [], 0
    for grad in map(gradient, parameters):
        if grad is None:
            continue
        if current and (size + grad.nbytes > BUCKET_BYTES or grad.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(grad)
        size += grad.nbytes
    return [*buckets, current] if current else buckets
