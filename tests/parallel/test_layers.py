import pytest
import torch
import torch.nn.functional as F

from megatron_exp.parallel import state
from megatron_exp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_exp.parallel.sharding import ShardSpec
from megatron_exp.parallel.state import Group
from tests.distributed import run_on_ranks

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _shard(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    tp = state.current().tp
    return ShardSpec.of(param).shard(full, tp.size, tp.rank)


def _load(layer, **full):
    with torch.no_grad():
        for name, tensor in full.items():
            getattr(layer, name).copy_(_shard(getattr(layer, name), tensor))


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check_column(dtype, gather_output):
    tp, close = state.current().tp, TOLERANCES[dtype]
    x, weight, bias = torch.randn(3, 5, 16, dtype=dtype), torch.randn(24, 16, dtype=dtype), torch.randn(24, dtype=dtype)
    layer = ColumnParallelLinear(16, 24, gather_output=gather_output).to(dtype)
    _load(layer, weight=weight, bias=bias)
    x_tp, x_ref, w_ref, b_ref = _leaf(x), _leaf(x), _leaf(weight), _leaf(bias)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)

    y = layer(x_tp)
    if gather_output:
        torch.testing.assert_close(y, y_ref, **close)
        y.backward(grad_out)
    else:
        torch.testing.assert_close(y, y_ref.chunk(tp.size, -1)[tp.rank], **close)
        y.backward(grad_out.chunk(tp.size, -1)[tp.rank])
    torch.testing.assert_close(x_tp.grad, x_ref.grad, **close)
    torch.testing.assert_close(layer.weight.grad, _shard(layer.weight, w_ref.grad), **close)
    torch.testing.assert_close(layer.bias.grad, _shard(layer.bias, b_ref.grad), **close)


def _check_row(dtype, input_is_parallel):
    tp, close = state.current().tp, TOLERANCES[dtype]
    x, weight, bias = torch.randn(3, 5, 24, dtype=dtype), torch.randn(16, 24, dtype=dtype), torch.randn(16, dtype=dtype)
    layer = RowParallelLinear(24, 16, input_is_parallel=input_is_parallel).to(dtype)
    _load(layer, weight=weight, bias=bias)
    x_ref, w_ref, b_ref = _leaf(x), _leaf(weight), _leaf(bias)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)

    x_tp = _leaf(x.chunk(tp.size, -1)[tp.rank] if input_is_parallel else x)
    y = layer(x_tp)
    torch.testing.assert_close(y, y_ref, **close)
    y.backward(grad_out)
    expected_x_grad = x_ref.grad.chunk(tp.size, -1)[tp.rank] if input_is_parallel else x_ref.grad
    torch.testing.assert_close(x_tp.grad, expected_x_grad, **close)
    torch.testing.assert_close(layer.weight.grad, _shard(layer.weight, w_ref.grad), **close)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, **close)  # replicated, full gradient on every rank


def _check_embedding(dtype):
    close = TOLERANCES[dtype]
    vocab = 300  # padded to 512 at TP=2 and 4: real rows on several ranks, padding on the last
    weight = torch.randn(vocab, 16, dtype=dtype)
    ids = torch.cat([torch.tensor([0, vocab - 1, 127, 128, 255, 256]), torch.randint(0, vocab, (30,))]).view(4, 9)
    layer = VocabParallelEmbedding(vocab, 16).to(dtype)
    _load(layer, weight=weight)
    w_ref = _leaf(weight)
    y_ref = F.embedding(ids, w_ref)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    y = layer(ids)
    torch.testing.assert_close(y, y_ref, **close)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, _shard(layer.weight, w_ref.grad), **close)


def _check_all_layers():
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)  # the same data and serial weights on every rank
        for gather_output in (False, True):
            _check_column(dtype, gather_output)
        for input_is_parallel in (True, False):
            _check_row(dtype, input_is_parallel)
        _check_embedding(dtype)


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_parallel_layers_equal_serial_layers(tp):
    run_on_ranks(tp, _check_all_layers)


def test_serial_layers_equal_torch():
    _check_all_layers()


def test_indivisible_features_fail_with_the_dimension_named():
    with pytest.raises(ValueError, match="out_features=25 is not divisible by the tensor-parallel size 2"):
        ColumnParallelLinear(16, 25, tp=Group(2, 0))
    with pytest.raises(ValueError, match="in_features=15 is not divisible by the tensor-parallel size 4"):
        RowParallelLinear(15, 16, tp=Group(4, 1))


def test_vocabulary_is_padded_to_a_multiple_of_128_times_tp():
    for tp, rows in [(1, 50304), (2, 50432), (8, 51200)]:
        layer = VocabParallelEmbedding(50257, 8, tp=Group(tp, tp - 1))
        assert layer.padded_vocab_size == rows
        assert layer.weight.shape == (rows // tp, 8)
        assert layer.vocab_start == (tp - 1) * rows // tp
