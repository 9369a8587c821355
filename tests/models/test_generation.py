"""Generation through the KV cache: the tokens of a full forward per step, whatever the padding, the TP degree or
the pipeline layout; sampling reproducible from its seed, and the same at every layout."""

import functools
from contextlib import nullcontext

import pytest
import torch

from megatron_exp.config import ModelConfig
from megatron_exp.models.contract import Batch
from megatron_exp.models.generation import generate, pad
from megatron_exp.models.gpt import GPTModel
from megatron_exp.models.kv_cache import KVCache
from megatron_exp.parallel import state
from megatron_exp.parallel.cross_entropy import vocab_parallel_argmax
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sampling import Sampling
from megatron_exp.training.schedule import Pipeline
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

# A large init makes the greedy continuation change from token to token (at GPT's 0.02 a random model repeats its
# last token, which a broken cache could do too). Dropout is on: generation must turn it off.
CFG = ModelConfig(hidden=32, heads=4, layers=2, vocab_size=300, seq_len=32, init_std=1.0)
PROMPTS = [[5, 7, 9], [1, 2, 3, 4, 5, 6], [42]]
SAMPLED = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3)


def _model() -> GPTModel:
    return GPTModel(CFG, seed=1).double()


@torch.no_grad()
def without_cache(model: GPTModel, prompt: list[int], count: int) -> list[int]:
    """Greedy continuation by repeated full forwards of the whole sequence (no cache), one token at a time."""
    model.eval()
    sequence = list(prompt)
    for _ in range(count):
        logits = model(torch.tensor([sequence]))[:, -1]
        sequence.append(int(vocab_parallel_argmax(logits, model.cfg.vocab_size, model.tp)))
    return sequence[len(prompt) :]


def padded_on_both_sides(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, real = pad(prompts, "left")
    zeros = torch.zeros(len(prompts), 2, dtype=torch.long)
    return torch.cat([zeros, tokens, zeros[:, :1]], 1), torch.cat([zeros.bool(), real, zeros[:, :1].bool()], 1)


def test_greedy_with_the_cache_is_the_argmax_of_full_forwards_for_any_padding():
    model = _model()
    count = CFG.seq_len - max(map(len, PROMPTS))  # up to the last position
    expected = [without_cache(model, prompt, count) for prompt in PROMPTS]
    assert all(len(set(tokens)) > 3 for tokens in expected)  # a continuation that varies
    model.train()
    for batch in (pad(PROMPTS, "left"), pad(PROMPTS, "right"), padded_on_both_sides(PROMPTS)):
        assert generate(model, *batch, count) == expected
    assert model.training  # its mode restored


def test_a_row_stops_at_the_stop_token_and_the_others_go_on():
    model = _model()
    tokens, real = pad(PROMPTS)
    full = generate(model, tokens, real, 12)
    stop = full[0][4]
    stopped = generate(model, tokens, real, 12, stop_token=stop)
    for row, new in zip(full, stopped, strict=True):
        assert new == (row[: row.index(stop)] if stop in row else row)


def test_the_prompt_and_new_tokens_must_fit_the_positions():
    tokens, real = pad(PROMPTS)
    with pytest.raises(ValueError, match="a prompt of 6 tokens \\+ 27 new ones exceeds the model's 32 positions"):
        generate(_model(), tokens, real, 27)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(_model(), tokens, torch.zeros_like(real), 4)


def test_sampling_is_reproducible_from_its_seed():
    model = _model()
    tokens, real = pad(PROMPTS)
    first = generate(model, tokens, real, 16, SAMPLED)
    assert generate(model, tokens, real, 16, SAMPLED) == first
    other = Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=4)
    assert generate(model, tokens, real, 16, other) != first
    assert first != generate(model, tokens, real, 16)  # not the greedy continuation


def _check_tp_generation_equals_serial():
    torch.set_default_dtype(torch.float64)
    with state.use(state.SERIAL):
        serial = GPTModel(CFG, seed=1)
    model = GPTModel(CFG, seed=1)  # this rank's shard of the same weights
    tokens, real = pad(PROMPTS)
    for sampling in (Sampling(), SAMPLED):
        assert generate(model, tokens, real, 20, sampling) == generate(serial, tokens, real, 20, sampling)

    cache = KVCache(len(PROMPTS), tokens.shape[1], model.device)
    cache.append(real)
    model.eval().encode(tokens, cache=cache)
    heads = CFG.heads // model.tp.size
    assert {k.shape for pair in cache.layers.values() for k in pair} == {(3, heads, tokens.shape[1], CFG.head_dim)}


def test_tp2_generates_what_tp1_generates_with_half_the_heads_cached_per_rank():
    run_on_ranks(2, _check_tp_generation_equals_serial)


def _check_pipelined_generation_equals_serial(virtual: int):
    torch.set_default_dtype(torch.float64)
    cfg = ModelConfig(hidden=32, heads=4, layers=4, vocab_size=300, seq_len=32, init_std=1.0)
    with state.use(state.SERIAL):
        serial = GPTModel(cfg, seed=1)
    grid = state.current()
    layout = PipelineLayout(grid.pp.size, virtual, cfg.layers)
    model = GPTModel(cfg, seed=1, part=layout.part(grid.pp.rank))  # this rank's shard of its stage
    pipeline = Pipeline(model, grid, layout, "interleaved" if virtual > 1 else "1f1b", nullcontext)
    tokens, real = pad(PROMPTS)
    for sampling in (Sampling(), SAMPLED):
        expected = generate(serial, tokens, real, 20, sampling)
        assert all(len(set(row)) > 3 for row in expected)  # a continuation that varies
        assert generate(model, tokens, real, 20, sampling, pipeline=pipeline) == expected
    stop = expected[0][4]  # a row ends early, the others go on, on every stage alike
    stopped = generate(model, tokens, real, 20, SAMPLED, stop, pipeline=pipeline)
    assert stopped == generate(serial, tokens, real, 20, SAMPLED, stop) and len(stopped[0]) < 20

    cache = KVCache(len(PROMPTS), tokens.shape[1], model.device)  # the cache of this stage's layers only
    cache.append(real)
    pipeline.outputs(Batch({"tokens": tokens}, {}), functools.partial(model.eval().encode, cache=cache))
    assert len(cache.layers) == len(model.part.layers) == cfg.layers // grid.pp.size


def test_pp2_generates_what_pp1_generates_greedy_and_sampled():
    run_on_ranks(2, _check_pipelined_generation_equals_serial, 1, pp=2)


@pytest.mark.slow
def test_tp2_x_pp2_generates_what_pp1_generates():
    run_on_ranks(4, _check_pipelined_generation_equals_serial, 1, pp=2)


@pytest.mark.slow
def test_pp2_with_two_virtual_stages_each_generates_what_pp1_generates():
    run_on_ranks(2, _check_pipelined_generation_equals_serial, 2, pp=2)  # stage 0: chunks 0, 2; stage 1: 1, 3
