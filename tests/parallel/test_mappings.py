import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_exp.parallel import state
from megatron_exp.parallel.mappings import (
    f,
    f_linear,
    f_sp,
    g,
    g_sp,
    gather_last_dim,
    gather_sequence,
    split_last_dim,
    split_sequence,
)
from megatron_exp.parallel.state import Group
from tests.distributed import run_on_ranks


def test_operators_are_the_identity_object_at_tp1():
    x = torch.randn(3, 4, requires_grad=True)
    for op in (f, g, split_last_dim, gather_last_dim, f_sp, g_sp, split_sequence, gather_sequence):
        assert op(x, Group()) is x


def _check_operators():
    tp = state.current().tp
    rank = tp.rank
    # Each rank holds different data, so sums and concatenations are recognisable.
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)

    y = f(x, tp)
    assert torch.equal(y, x)
    y.backward(torch.full_like(y, float(rank + 1)))
    assert torch.equal(x.grad, torch.full_like(x, 3.0))  # gradients summed: 1 + 2

    x.grad = None
    y = g(x, tp)
    assert torch.equal(y, torch.full_like(x, 3.0))
    y.backward(torch.full_like(y, 7.0))
    assert torch.equal(x.grad, torch.full_like(x, 7.0))  # gradient passed through

    full = torch.arange(8, dtype=torch.float64).reshape(2, 4).requires_grad_()
    part = split_last_dim(full, tp)
    assert torch.equal(part, full[:, 2 * rank : 2 * rank + 2])
    part.backward(torch.ones_like(part))
    assert torch.equal(full.grad, torch.ones_like(full))  # every slice's gradient gathered

    part = torch.full((2, 2), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = gather_last_dim(part, tp)
    assert torch.equal(gathered, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, dtype=torch.float64))
    gathered.backward(torch.arange(8, dtype=torch.float64).reshape(2, 4))
    assert torch.equal(part.grad, torch.arange(8, dtype=torch.float64).reshape(2, 4)[:, 2 * rank : 2 * rank + 2])
    assert dist.get_world_size() == 2


def test_f_g_split_gather_forward_and_backward_at_tp2():
    run_on_ranks(2, _check_operators)


@pytest.mark.parametrize("autocast", [False, True])
def test_f_linear_matches_f_then_linear_at_tp1(autocast):
    """The fused form computes F.linear's output and gradients (weight gradient contiguous, in the parameter's
    dtype), also under bf16 autocast."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    weight, bias = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    results = []
    for linear in (lambda: F.linear(x, weight, bias), lambda: f_linear(x, weight, bias, Group(1, 0))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = linear()
        out.float().square().sum().backward()
        results.append((out, x.grad, weight.grad, bias.grad))
        x.grad = weight.grad = bias.grad = None
    for ours, reference in zip(results[1], results[0], strict=True):
        assert ours.dtype == reference.dtype and ours.shape == reference.shape
        torch.testing.assert_close(ours, reference, rtol=1e-2 if autocast else 1e-6, atol=1e-2 if autocast else 1e-6)
    assert results[1][2].is_contiguous()


def _check_sequence_operators():
    """The sequence-parallel pair and the plain sequence split/gather at tp=2, on [batch=2, seq, 3] tensors whose
    entries name their rank and position, so sums and concatenations are recognisable."""
    tp = state.current().tp
    rank = tp.rank

    def positions(seq: int, offset: int = 0, scale: float = 1.0) -> torch.Tensor:
        values = scale * (torch.arange(seq, dtype=torch.float64) + offset)
        return values[None, :, None].expand(2, seq, 3).contiguous()

    shard = positions(2, offset=2 * rank).requires_grad_()  # this rank's positions of a 4-token sequence
    full = f_sp(shard, tp)
    assert torch.equal(full, positions(4))
    full.backward(positions(4, scale=rank + 1))  # each rank's partial gradient: summed, then scattered
    assert torch.equal(shard.grad, positions(2, offset=2 * rank, scale=3))

    partial = positions(4, scale=rank + 1).requires_grad_()  # each rank's partial sum over the whole sequence
    mine = g_sp(partial, tp)
    assert torch.equal(mine, positions(2, offset=2 * rank, scale=3))
    mine.backward(positions(2, offset=2 * rank))  # the shard gradients are gathered
    assert torch.equal(partial.grad, positions(4))

    replicated = positions(4).requires_grad_()
    part = split_sequence(replicated, tp)
    assert torch.equal(part, positions(2, offset=2 * rank))
    part.backward(torch.ones_like(part))
    assert torch.equal(replicated.grad, torch.ones_like(replicated))

    shard.grad = None
    gathered = gather_sequence(shard, tp)
    assert torch.equal(gathered, positions(4))
    gathered.backward(positions(4))  # replicated gradient: keep this rank's shard, no sum
    assert torch.equal(shard.grad, positions(2, offset=2 * rank))

    # f_linear with sequence_parallel equals f_sp followed by F.linear, in output and every gradient
    torch.manual_seed(rank)  # different shards and weight slices per rank
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    results = []
    for linear in (lambda: F.linear(f_sp(x, tp), weight, bias), lambda: f_linear(x, weight, bias, tp, True)):
        out = linear()
        out.square().sum().backward()
        results.append((out, x.grad, weight.grad, bias.grad))
        x.grad = weight.grad = bias.grad = None
    assert results[0][0].shape == (3, 8, 6)
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"sequence length 3 is not divisible by the TP size 2"):
        g_sp(torch.zeros(1, 3, 2), tp)


def test_sequence_parallel_operators_forward_and_backward_at_tp2():
    run_on_ranks(2, _check_sequence_operators)
