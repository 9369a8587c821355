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


class _F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad, ctx.tp), None


class _FLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tp):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast here, so that backward sees the same dtypes
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.tp, ctx.has_bias = tp, bias is not None
        with torch.autocast(device, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = pending = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
            if ctx.tp.size > 1:  # f: sum the input gradient over the TP group, while the weight gradient computes
                pending = dist.all_reduce(grad_x, group=ctx.tp.handle, async_op=True)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = flat_grad.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if pending is not None:
            pending.wait()
        return grad_x, grad_weight, grad_bias, None


class _G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _reduce(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.tp), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.tp), None


def f(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient backward."""
    return x if tp.size == 1 else _F.apply(x, tp)


def f_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: Group) -> torch.Tensor:
    """F.linear(f(x), weight, bias), with f's backward all-reduce overlapped with the weight gradient."""
    return _FLinear.apply(x, weight, bias, tp)


def g(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Leave a TP region: all-reduce forward, identity backward."""
    return x if tp.size == 1 else _G.apply(x, tp)


def split_last_dim(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; backward all-gathers the gradient."""
    return x if tp.size == 1 else _Split.apply(x, tp)


def gather_last_dim(x: torch.Tensor, tp: Group) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension; backward keeps this rank's slice."""
    return x if tp.size == 1 else _Gather.apply(x, tp)
