import contextlib
import hashlib
import math
from pathlib import Path

import pytest
import torch

from megatron_exp.config import (
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TokenizerConfig,
    WikiTextConfig,
    WikiTextEvalConfig,
    check_ranges,
)
from megatron_exp.data.tokenizer import gpt2
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.sharding import shard_specs, split_state_dict
from megatron_exp.tasks import common, wikitext103
from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.tasks.fixtures import NextTokenOracle, single_threaded

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.parametrize(
    "num_tokens, seq_len, stride",
    [(1000, 64, 32), (1001, 64, 32), (1037, 64, 7), (50, 64, 32), (65, 64, 32), (66, 64, 32), (500, 16, 16), (2, 8, 1)],
)
def test_every_target_is_scored_exactly_once(num_tokens, seq_len, stride):
    tokens = list(range(num_tokens))
    spans = wikitext103.windows(num_tokens, seq_len, stride)
    inputs, targets, mask = wikitext103.window_batch(tokens, spans, seq_len)
    assert mask.sum() == num_tokens - 1
    scored = targets[mask].tolist()  # token i is target index i here
    assert sorted(scored) == list(range(1, num_tokens))
    assert mask[0].sum() == min(seq_len, num_tokens - 1)  # window 0 scores all its targets
    assert all(row.sum() <= stride for row in mask[1:])  # later windows only their last `stride`
    for row in range(len(spans)):  # every scored target after window 0 has seq_len - stride tokens of context
        positions = mask[row].nonzero().flatten()
        if row > 0:
            assert positions.min() >= seq_len - stride
        assert torch.equal(targets[row, positions], inputs[row, positions] + 1)


def test_a_stride_longer_than_the_window_is_an_error():
    with pytest.raises(ConfigError, match=r"task.stride=65 must be between 1 and the sequence length 64"):
        wikitext103.windows(1000, 64, 65)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("the players ' union", "the players' union"),  # plural possessive
        ("John 's team", "John's team"),
        ("a well @-@ known 1 @,@ 000 in 2 @.@ 5 and 3 @/@ 4", "a well-known 1,000 in 2.5 and 3 @/@ 4"),  # only these
        ("It ended . Then : this ; that ! why ? so , on", "It ended. Then: this; that! why? so, on"),
        ("a , , b", "a, , b"),  # one pass per mark: the second comma's space was consumed by the first match
        ("x . , y", "x., y"),  # marks in turn (period before comma)
        ("wait ... what", "wait ... what"),  # an ellipsis keeps its spaces
        ("the end . \n", "the end.\n"),  # the space before the newline goes next
        ("( so far )", "(so far)"),
        ("( a ( b ) c )", "(a ( b) c )"),  # nested: the first opener pairs with the first closer
        ("[ x ] and { y }", "[x] and {y}"),
        ('he said " no \n more " .', 'he said "no\nmore" .'),  # quotes across a newline; " ." then stays
        ('" a \n b " and "\n c "', '"a\nb" and "c"'),  # a newline just inside a pair goes
        ("the ' Bulls ' won", "the 'Bulls' won"),  # single quotes pair too
        ('a " b', 'a " b'),  # an unpaired quote is left alone
        (" = = Early life = = \n = = = Youth = = = \n", " == Early life ==\n=== Youth ===\n"),
        ("at 15 ° C", "at 15°C"),
        ("line  \n  next", "line \n next"),  # one space either side of a newline, not all
        ("a N b", "a 1 b"),
    ],
)
def test_each_rule_of_the_papers_detokenizer(raw, expected):
    assert wikitext103.detokenize(raw) == expected


def test_an_unknown_detokenizer_is_a_one_line_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"^task.detokenizer=clean is unknown: use paper or none$"):
        check_ranges(WikiTextEvalConfig(task=WikiTextConfig(detokenizer="clean")))


def test_detokenizer_none_keeps_the_word_level_text():
    raw = " = Title = \n It 's 2 @.@ 5 . \n"
    assert wikitext103.DETOKENIZERS["none"](raw) == raw


@pytest.mark.skipif(not (SHARED / "wikitext103_test.tokens").is_file(), reason="../shared/data is not present")
def test_the_real_test_file_detokenizes_byte_for_byte_as_the_paper_did():
    (text,) = common.read_texts(WikiTextConfig(source=str(SHARED / "wikitext103_test.tokens")))
    detokenized = wikitext103.detokenize(text).encode("utf-8")
    assert len(detokenized) == 1_206_463 and detokenized.count(b"\n") + 1 == 4_333
    assert hashlib.sha256(detokenized).hexdigest() == "f7a499621c56efe6af6dfcf0000730cb19f60063656a277e0dc881c165d6c397"


@pytest.mark.skipif(not (SHARED / "wikitext103_test.tokens").is_file(), reason="../shared/data is not present")
def test_the_real_test_file_has_the_papers_word_count():
    text = (SHARED / "wikitext103_test.tokens").read_text(encoding="utf-8")
    assert wikitext103.word_count(text) == 245_566


def test_a_model_that_always_predicts_the_target_scores_perplexity_one():
    task = WikiTextConfig(seq_len=16, stride=4, batch_size=3)
    tokens = [i % 300 for i in range(250)]
    inputs = {"tokens": tokens, "words": 100}
    perfect = wikitext103.evaluate(common.TokenScores(NextTokenOracle(300)), task, inputs)
    assert perfect["scored_targets"] == 249 and perfect["ppl"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["word_ppl"] == pytest.approx(1.0, abs=1e-9)
    wrong = wikitext103.evaluate(common.TokenScores(NextTokenOracle(300, shift=2)), task, inputs)
    assert wrong["loss"] == pytest.approx(100.0, rel=1e-4) and wrong["word_ppl"] == pytest.approx(
        math.exp(100.0 * 249 / 99), rel=1e-3
    )


CFG = ModelConfig(name="eval", hidden=64, heads=4, layers=4, vocab_size=300, seq_len=32)
TOKENS = [int(t) for t in torch.randint(0, 300, (400,), generator=torch.Generator().manual_seed(0))]


def _saved_checkpoint(path: Path) -> Path:
    serial = GPTModel(CFG, seed=5)
    meta = {"tp": 1, "dp": 1, "model": vars(CFG)}
    return checkpoint.save_all(path, 0, [{"iteration": 0, "model": serial.state_dict()}], meta)


def _evaluate_at_current_tp(directory: Path, expected: dict | None, out: Path | None, virtual_stages: int = 1):
    parallel = ParallelConfig(virtual_stages=virtual_stages)
    scores = common.token_scores(directory, state.current(), torch.device("cpu"), parallel, contextlib.nullcontext)
    task = WikiTextConfig(seq_len=32, stride=8, batch_size=4)
    results = wikitext103.evaluate(scores, task, {"tokens": TOKENS, "words": 150})
    if out is not None:
        torch.save(results, out)
    if expected is not None:
        for key, value in expected.items():
            assert results[key] == pytest.approx(value, rel=1e-5), key


def test_tp2_evaluation_equals_tp1(tmp_path):
    directory = _saved_checkpoint(tmp_path / "run")
    _evaluate_at_current_tp(directory, None, tmp_path / "tp1.pt")
    expected = torch.load(tmp_path / "tp1.pt")
    assert expected["scored_targets"] == 399
    run_on_ranks(2, _evaluate_at_current_tp, directory, expected, None)


@pytest.mark.parametrize("tp, pp, virtual", [(1, 2, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow)])
def test_pipelined_evaluation_equals_serial(tmp_path, tp, pp, virtual):
    """The stages' forward, the scores broadcast from the last: every rank reports the serial numbers."""
    directory = _saved_checkpoint(tmp_path / "run")
    _evaluate_at_current_tp(directory, None, tmp_path / "serial.pt")
    run_on_ranks(tp * pp, _evaluate_at_current_tp, directory, torch.load(tmp_path / "serial.pt"), None, virtual, pp=pp)


def test_a_tp_shard_split_of_the_same_weights_gives_the_same_numbers(tmp_path):
    serial = GPTModel(CFG, seed=5)
    shards = split_state_dict(serial.state_dict(), shard_specs(serial), 2)
    meta = {"tp": 2, "dp": 1, "model": vars(CFG)}
    saved_at_tp2 = checkpoint.save_all(tmp_path / "tp2", 0, [{"iteration": 0, "model": s} for s in shards], meta)
    _evaluate_at_current_tp(_saved_checkpoint(tmp_path / "tp1"), None, tmp_path / "a.pt")
    _evaluate_at_current_tp(saved_at_tp2, torch.load(tmp_path / "a.pt"), None)  # merged on load, at TP=1


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "wikitext103_test.tokens").is_file(), reason="../shared/data is not present")
def test_batched_windows_score_bit_identically_to_one_at_a_time_on_the_real_file():
    (text,) = common.read_texts(WikiTextConfig(source=str(SHARED / "wikitext103_test.tokens")))
    tokens = gpt2(TokenizerConfig(kind="gpt2")).encode(wikitext103.detokenize(text)[:12_000]).ids  # a prefix
    model = GPTModel(ModelConfig(hidden=64, heads=4, layers=2, seq_len=64), seed=0).eval()  # GPT-2's vocabulary
    inputs = {"tokens": tokens, "words": 2_000}
    with single_threaded():
        one, batched = (
            wikitext103.evaluate(
                common.TokenScores(model), WikiTextConfig(seq_len=64, stride=16, batch_size=size), inputs
            )
            for size in (1, 7)
        )
    assert (
        one["scored_targets"] == len(tokens) - 1 and len(wikitext103.windows(len(tokens), 64, 16)) % 7
    )  # one short batch
    assert batched == one  # exactly: loss, ppl and word_ppl to the last bit
