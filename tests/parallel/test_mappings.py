import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_exp.parallel import state
from megatron_exp.parallel.mappings import f, f_linear, g, gather_last_dim, split_last_dim
from megatron_exp.parallel.state import Group
from tests.distributed import run_on_ranks


def test_operators_are_the_identity_object_at_tp1():
    x = torch.randn(3, 4, requires_grad=True)
    for op in (f, g, split_last_dim, gather_last_dim):
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
