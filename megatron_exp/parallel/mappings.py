"""The paper's two operators, and the split/gather pair, as autograd functions over a TP group.

In a TP region each rank holds a slice of the activations (some heads, some MLP columns). Two conjugate
operators enter and leave it (Shoeybi et al., 2019, Figure 3):

    f: identity forward, all-reduce backward. Where a replicated activation enters a TP region, each rank's
       gradient is only its own slice's contribution; summing them gives the true gradient.
    g: all-reduce forward, identity backward. Where partial results leave a TP region, their sum is the output;
       its gradient is already replicated on every rank.

A transformer layer uses f twice and g twice: one pair around attention, one around the MLP.
At TP size 1 every operator returns its input untouched.

`f_linear` is f followed by the column-parallel matmul, as one function so that backward can start f's
all-reduce of the input gradient and compute the weight gradient while it runs (Megatron's overlap). Every
f in this package's models is followed by such a matmul, so they use f_linear; f is the operator for any other
entry into a TP region.

Sequence parallelism (Korthikanti et al., 2022, Figure 5) splits what lies between the TP regions (layernorms,
dropouts, the residual stream) along the sequence: each rank keeps [batch, seq / tp, hidden]. An all-reduce is a
reduce-scatter followed by an all-gather, so f and g are replaced by the conjugate pair that moves the same
bytes (the paper calls them g and g-bar; here they take f's and g's places, hence their names):

    f_sp: all-gather along the sequence forward, reduce-scatter backward: the whole sequence enters the region.
    g_sp: reduce-scatter along the sequence forward, all-gather backward: each rank leaves with its shard of the
          summed output.

`f_linear(..., sequence_parallel=True)` fuses f_sp with the matmul. It saves only this rank's shard of the input
and gathers it again in backward (the paper's section 4.2.2: 1/tp of the memory for one more all-gather), while the
input-gradient matmul runs; the input gradient's reduce-scatter then overlaps the weight gradient.
`split_sequence` and `gather_sequence` are the plain pair (gradients replicated, not partial): gather_sequence
brings a replicated computation (BERT's pooler, on [CLS]) the positions it needs.

Tensors are [batch, seq, hidden], so a sequence shard is not contiguous in memory: the collectives run on a
[tp x batch, seq / tp, ...] staging layout (a copy, free at batch 1) and the sequence is reassembled from it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_exp.parallel.state import Group


def all_reduce_(tensor: torch.Tensor, group: Group, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over one dimension of the grid (the TP group, mostly), outside autograd (a no-op at
    size 1)."""
    if group.size > 1:
        dist.all_reduce(tensor, op=op, group=group.handle)
    return tensor


def _reduce(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return all_reduce_(x.clone(memory_format=torch.contiguous_format), tp)


def _split(x: torch.Tensor, tp: Group) -> torch.Tensor:
    if x.shape[-1] % tp.size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the TP size {tp.size}")
    return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()


def _gather(x: torch.Tensor, tp: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.handle)
    return torch.cat(parts, dim=-1)


def _check_sequence(x: torch.Tensor, tp: Group) -> None:
    if x.shape[1] % tp.size:
        raise ValueError(f"sequence length {x.shape[1]} is not divisible by the TP size {tp.size}")


def _split_sequence(x: torch.Tensor, tp: Group) -> torch.Tensor:
    _check_sequence(x, tp)
    return x.chunk(tp.size, dim=1)[tp.rank].contiguous()


def _start_gather_sequence(x: torch.Tensor, tp: Group) -> tuple[torch.Tensor, dist.Work]:
    """Start all-gathering the shards [batch, seq / tp, ...] into a [tp x batch, seq / tp, ...] buffer."""
    staged = x.new_empty((tp.size * x.shape[0], *x.shape[1:]))
    return staged, dist.all_gather_single(staged, x.contiguous(), group=tp.handle, async_op=True)


def _sequence_of(staged: torch.Tensor, tp: Group) -> torch.Tensor:
    """[tp x batch, seq / tp, ...] -> [batch, seq, ...]."""
    return staged.unflatten(0, (tp.size, -1)).movedim(0, 1).flatten(1, 2)


def _gather_sequence(x: torch.Tensor, tp: Group) -> torch.Tensor:
    staged, work = _start_gather_sequence(x, tp)
    work.wait()
    return _sequence_of(staged, tp)


def _start_reduce_scatter_sequence(x: torch.Tensor, tp: Group) -> tuple[torch.Tensor, dist.Work]:
    """Start summing [batch, seq, ...] over the group, each rank receiving its [batch, seq / tp, ...] shard."""
    _check_sequence(x, tp)
    staged = x.unflatten(1, (tp.size, -1)).movedim(1, 0).flatten(0, 1)  # [tp x batch, seq / tp, ...]
    shard = staged.new_empty((x.shape[0], *staged.shape[1:]))
    return shard, dist.reduce_scatter_single(shard, staged, group=tp.handle, async_op=True)


def _reduce_scatter_sequence(x: torch.Tensor, tp: Group) -> torch.Tensor:
    shard, work = _start_reduce_scatter_sequence(x, tp)
    work.wait()
    return shard


class _FLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tp, sequence_parallel):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast here, so that backward sees the same dtypes
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)  # with SP, this rank's shard only
        ctx.tp, ctx.has_bias, ctx.sequence_parallel = tp, bias is not None, sequence_parallel
        with torch.autocast(device, enabled=False):
            return F.linear(_gather_sequence(x, tp) if sequence_parallel else x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        tp, sequence_parallel = ctx.tp, ctx.sequence_parallel
        gathering = None
        if sequence_parallel and ctx.needs_input_grad[1]:  # the weight gradient needs the whole input again
            staged, gathering = _start_gather_sequence(x, tp)
        grad_x = pending = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
        if gathering is not None:
            gathering.wait()
            x = _sequence_of(staged, tp)
        if grad_x is not None and tp.size > 1:  # sum the input gradient over the group (f or f_sp) while the
            if sequence_parallel:  # weight gradient computes
                grad_x, pending = _start_reduce_scatter_sequence(grad_x, tp)
            else:
                pending = dist.all_reduce(grad_x, group=tp.handle, async_op=True)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if pending is not None:
            pending.wait()
        return grad_x, grad_weight, grad_bias, None, None


def _unchanged(x: torch.Tensor, tp: Group) -> torch.Tensor:
    return x


def _conjugate(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function that applies `forward(x, tp)` and, to the gradient, `backward(grad, tp)`."""

    def apply_forward(ctx, x, tp):
        ctx.tp = tp
        return forward(x, tp)

    def apply_backward(ctx, grad):
        return backward(grad, ctx.tp), None

    members = {"forward": staticmethod(apply_forward), "backward": staticmethod(apply_backward)}
    return type(name, (torch.autograd.Function,), members)


# (forward, backward) of each operator: every one is its partner's conjugate
_F = _conjugate("_F", _unchanged, _reduce)
_G = _conjugate("_G", _reduce, _unchanged)
_FSequence = _conjugate("_FSequence", _gather_sequence, _reduce_scatter_sequence)
_GSequence = _conjugate("_GSequence", _reduce_scatter_sequence, _gather_sequence)
_SplitSequence = _conjugate("_SplitSequence", _split_sequence, _gather_sequence)
_GatherSequence = _conjugate("_GatherSequence", _gather_sequence, _split_sequence)
_Split = _conjugate("_Split", _split, _gather)
_Gather = _conjugate("_Gather", _gather, _split)


def f(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient backward."""
    return x if tp.size == 1 else _F.apply(x, tp)


def f_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: Group, sequence_parallel: bool = False
) -> torch.Tensor:
    """F.linear(f(x), weight, bias), with f's backward all-reduce overlapped with the weight gradient; with
    `sequence_parallel`, F.linear(f_sp(x), weight, bias) for x this rank's sequence shard."""
    return _FLinear.apply(x, weight, bias, tp, sequence_parallel and tp.size > 1)


def g(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Leave a TP region: all-reduce forward, identity backward."""
    return x if tp.size == 1 else _G.apply(x, tp)


def split_last_dim(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; backward all-gathers the gradient."""
    return x if tp.size == 1 else _Split.apply(x, tp)


def gather_last_dim(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension; backward keeps this rank's slice."""
    return x if tp.size == 1 else _Gather.apply(x, tp)


def f_sp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Enter a TP region from sequence shards: all-gather along the sequence (dim 1) forward, reduce-scatter of
    the gradient backward."""
    return x if tp.size == 1 else _FSequence.apply(x, tp)


def g_sp(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Leave a TP region into sequence shards: reduce-scatter along the sequence forward, all-gather of the
    gradient backward."""
    return x if tp.size == 1 else _GSequence.apply(x, tp)


def split_sequence(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Keep this rank's shard of the sequence (dim 1) of a replicated tensor; backward all-gathers the gradient."""
    return x if tp.size == 1 else _SplitSequence.apply(x, tp)


def gather_sequence(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Concatenate every rank's sequence shard into a replicated tensor; backward keeps this rank's shard."""
    return x if tp.size == 1 else _GatherSequence.apply(x, tp)
