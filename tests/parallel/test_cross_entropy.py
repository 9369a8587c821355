import pytest
import torch
import torch.nn.functional as F

from megatron_exp.parallel import state
from megatron_exp.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_exp.parallel.sharding import padded_vocab_size
from tests.distributed import run_on_ranks


def _padded_logits(vocab: int, padded: int, dtype=torch.float64) -> torch.Tensor:
    """Logits over the real vocabulary, with padding columns holding large values that must be ignored."""
    real = torch.randn(2, 7, vocab, dtype=dtype) * 3
    return torch.cat([real, torch.full((2, 7, padded - vocab), 50.0, dtype=dtype)], dim=-1)


def _check_cross_entropy(vocab: int, padded: int):
    tp = state.current().tp
    torch.manual_seed(vocab + padded)
    logits = _padded_logits(vocab, padded)
    target = torch.randint(0, vocab, (2, 7))
    target[0, :3] = torch.tensor([0, vocab - 1, vocab // 2])

    ref_logits = logits[..., :vocab].clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), target.reshape(-1), reduction="none").view(2, 7)
    grad_loss = torch.rand_like(ref)
    ref.backward(grad_loss)

    local = logits.chunk(tp.size, -1)[tp.rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, vocab, tp)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward(grad_loss)
    full_grad = torch.cat([ref_logits.grad, torch.zeros(2, 7, padded - vocab, dtype=torch.float64)], -1)
    torch.testing.assert_close(local.grad, full_grad.chunk(tp.size, -1)[tp.rank], rtol=1e-12, atol=1e-12)

    argmax = vocab_parallel_argmax(local, vocab, tp)
    assert torch.equal(argmax, ref_logits.argmax(-1)), "padding columns must never win the argmax"


def _check_all_paddings():
    tp = state.current().tp.size
    for vocab in (300, 1000, 128 * tp):  # padding on one rank, on several ranks, and none
        for padded in (padded_vocab_size(vocab, tp), padded_vocab_size(vocab, tp) + 128 * tp):
            _check_cross_entropy(vocab, padded)


def test_cross_entropy_equals_torch_at_tp1():
    _check_all_paddings()


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_vocab_parallel_cross_entropy_equals_torch(tp):
    run_on_ranks(tp, _check_all_paddings)


def test_fp32_and_bf16_logits_give_fp32_loss_and_gradients_of_the_input_dtype():
    tp = state.current().tp
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(4, 256, dtype=dtype, requires_grad=True)
        original = logits.detach().clone()
        target = torch.randint(0, 200, (4,))
        loss = vocab_parallel_cross_entropy(logits, target, 200, tp)
        assert loss.dtype == torch.float32
        reference_logits = logits.detach()[:, :200].float().requires_grad_()
        ref = F.cross_entropy(reference_logits, target, reduction="none")
        torch.testing.assert_close(loss, ref)
        loss.sum().backward()
        ref.sum().backward()
        assert logits.grad.dtype == dtype and torch.all(logits.grad[:, 200:] == 0)
        torch.testing.assert_close(logits.grad[:, :200], reference_logits.grad.to(dtype))
        assert torch.equal(logits.detach(), original), "the caller's logits are left as they were"


def test_argmax_ties_go_to_the_lowest_id():
    logits = torch.zeros(1, 256)
    logits[0, [5, 9]] = 1.0
    assert vocab_parallel_argmax(logits, 200, state.current().tp).item() == 5
