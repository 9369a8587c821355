"""The vocab-parallel sampler: greedy is the argmax, sampling follows the (filtered) softmax, the filters keep
exactly the tokens they should, padding is never chosen, and TP=2 picks the same tokens as TP=1."""

import pytest
import torch

from megatron_exp.parallel import state
from megatron_exp.parallel.sampling import Sampler, Sampling
from megatron_exp.parallel.sharding import padded_vocab_size
from megatron_exp.parallel.state import Group
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300  # padded to 384 at TP=1 and to 512 at TP=2: the draws must not depend on it
SERIAL = Group()


def padded(real: torch.Tensor, tp: int = 1) -> torch.Tensor:
    """Logits over the padded vocabulary; the padding columns get the largest values of all, so a sampler that
    forgot them would choose them."""
    rows = real.shape[0]
    return torch.cat([real, torch.full((rows, padded_vocab_size(VOCAB, tp) - VOCAB), 1e4, dtype=real.dtype)], -1)


def sample(real: torch.Tensor, **options) -> torch.Tensor:
    return Sampler(Sampling(**options), VOCAB, SERIAL, real.device)(padded(real))


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=VOCAB).double() / tokens.numel()


def kept_by_reference(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """[rows, VOCAB] True where the filters keep a token, by sorting the whole vocabulary (ties kept)."""
    x = logits.double() / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    ordered = x.sort(dim=-1, descending=True).values
    mass = ordered.softmax(dim=-1).cumsum(dim=-1)
    edge = ordered.gather(-1, (mass < top_p).sum(-1, keepdim=True).clamp(max=VOCAB - 1))
    return (x >= edge) & (x > float("-inf"))


def test_greedy_is_the_argmax_of_the_real_vocabulary():
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, seed=7, top_k=2), logits.argmax(-1))  # temperature 0: nothing else matters


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_samples_follow_the_softmax_at_the_temperature(temperature):
    row = torch.full((VOCAB,), -30.0)
    row[[3, 150, 250, 299]] = torch.tensor([1.0, 0.5, 0.0, -1.0])  # across both TP=2 shards, last real id too
    tokens = sample(row.expand(20000, VOCAB), temperature=temperature, seed=1)
    expected = (row / temperature).softmax(-1).double()
    assert set(tokens.tolist()) == {3, 150, 250, 299}
    torch.testing.assert_close(frequencies(tokens), expected, atol=0.01, rtol=0)


def test_top_k_keeps_only_the_k_largest():
    logits = torch.randn(4000, VOCAB, generator=torch.Generator().manual_seed(2))
    tokens = sample(logits, temperature=5.0, top_k=3, seed=3)  # hot: without top-k nearly any token comes up
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == tokens[:, None]).any(-1).all()
    assert {int((top3[:, rank] == tokens).sum() > 0) for rank in range(3)} == {1}  # each of the three is drawn


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, [7]), (0.75, [7, 260]), (0.85, [7, 260, 100])])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, kept):
    probabilities = {7: 0.5, 260: 0.3, 100: 0.15, 299: 0.05}
    row = torch.full((VOCAB,), -1e9)
    row[list(probabilities)] = torch.tensor(list(probabilities.values())).log()
    tokens = sample(row.expand(20000, VOCAB), temperature=1.0, top_p=top_p, seed=4)
    assert sorted(set(tokens.tolist())) == sorted(kept)
    expected = torch.zeros(VOCAB, dtype=torch.float64)
    expected[kept] = torch.tensor([probabilities[t] for t in kept], dtype=torch.float64)
    torch.testing.assert_close(frequencies(tokens), expected / expected.sum(), atol=0.01, rtol=0)


def test_a_seed_gives_the_same_draws_and_another_seed_others():
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(5))
    options = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    assert torch.equal(sample(logits, seed=1, **options), sample(logits, seed=1, **options))
    assert not torch.equal(sample(logits, seed=1, **options), sample(logits, seed=2, **options))


def _wide_nucleus() -> torch.Tensor:
    """Rows whose nucleus is wider than the first round of candidates (64 per shard): 200 tied tokens and 100
    distinct ones below them (the 200 hold 0.9 of the mass), and random rows."""
    flat = torch.zeros(2, VOCAB)
    flat[:, torch.randperm(VOCAB, generator=torch.Generator().manual_seed(6))[:100]] = torch.linspace(-1, -2, 100)
    return torch.cat([flat, torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(7))])


CASES = {
    "temperature": {"temperature": 1.0},
    "top_k": {"temperature": 0.7, "top_k": 5},
    "top_p tied": {"temperature": 1.0, "top_p": 0.8},  # the 200 tied tokens exactly
    "top_p below the ties": {"temperature": 1.0, "top_p": 0.95},  # and some of the 100 below them
    "all three": {"temperature": 3.0, "top_k": 40, "top_p": 0.6},
}
REPEATS = 200


def _draws(logits: torch.Tensor, tp: Group) -> dict[str, torch.Tensor]:
    """The tokens each case draws for REPEATS copies of every row, from this rank's slice of the logits."""
    part = padded_vocab_size(VOCAB, tp.size) // tp.size
    mine = padded(logits.repeat(REPEATS, 1), tp.size)[:, tp.rank * part : (tp.rank + 1) * part]
    return {name: Sampler(Sampling(**case, seed=11), VOCAB, tp, mine.device)(mine) for name, case in CASES.items()}


def _check_tp_draws_equal_serial(logits: torch.Tensor):
    torch.set_default_dtype(torch.float64)
    logits = logits.double()
    parallel, serial = _draws(logits, state.current().tp), _draws(logits, SERIAL)
    repeated = logits.repeat(REPEATS, 1)
    for name, case in CASES.items():
        assert torch.equal(parallel[name], serial[name]), name
        kept = kept_by_reference(repeated, **case)
        assert kept.gather(-1, serial[name][:, None]).all(), name  # only tokens that the filters keep
    below_the_ties = repeated.gather(-1, serial["top_p below the ties"][:, None])[:, 0] < 0
    assert below_the_ties.view(REPEATS, -1)[:, :2].any()  # the nucleus reached past the first candidates


def test_tp2_draws_the_tokens_of_tp1_and_the_filters_are_exact_across_shards():
    logits = _wide_nucleus()
    assert kept_by_reference(logits, 1.0, top_p=0.8)[0].sum() == 200
    assert 220 < kept_by_reference(logits, 1.0, top_p=0.95)[0].sum() < 300
    run_on_ranks(2, _check_tp_draws_equal_serial, logits)
