import json
from pathlib import Path

import pytest
import torch

from megatron_exp.config import ModelConfig, TaskConfig, TokenizerConfig
from megatron_exp.data.tokenizer import gpt2
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.tasks import common, lambada
from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.tasks.fixtures import NextTokenOracle

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
GPT2 = gpt2(TokenizerConfig(kind="gpt2"))


@pytest.mark.parametrize(
    "text, context, word",
    [
        ("I can make it there on my own, Shane", "I can make it there on my own,", "Shane"),
        ('He said "wait"\n\nand then left', 'He said "wait"\n\nand then', "left"),
        ("the word, then the word", "the word, then the", "word"),  # the last occurrence, not the first
        ("  trailing spaces   ending  \n", "trailing spaces", "ending"),
        ("tiny statuette", "tiny", "statuette"),
    ],
)
def test_the_target_is_the_whole_last_word(text, context, word):
    assert lambada.split_last_word(text) == (context, word)


def test_strict_targets_are_every_token_of_the_last_word():
    ((context, target),) = lambada.encode(["She looked at the little statuette"], GPT2, strict=True)
    assert target == GPT2.encode(" statuette").ids == [1185, 84, 5857]  # a multi-token word
    assert GPT2.decode(context) == "She looked at the little"
    ((context, target),) = lambada.encode(["She looked at the little statuette"], GPT2, strict=False)
    assert target == [5857] and len(context) == len(GPT2.encode("She looked at the little statuette").ids) - 1


@pytest.mark.skipif(not (SHARED / "lambada_test.jsonl").is_file(), reason="../shared/data is not present")
def test_the_real_test_set_loads_with_hand_checked_targets():
    texts = common.read_texts(TaskConfig(source=str(SHARED / "lambada_test.jsonl")))
    assert len(texts) == 5153
    examples = lambada.encode(texts[:4], GPT2, strict=True)
    assert [GPT2.decode(target) for _, target in examples] == [" signs", " Shane", " insurance", " Helen"]
    assert GPT2.decode(examples[1][0]).endswith('"I can make it there on my own,')  # quote and comma kept


def test_batches_mask_exactly_the_target_positions_and_truncate_old_context():
    examples = [([1, 2, 3, 4, 5], [6, 7]), ([8], [9])]
    inputs, targets, mask = lambada.example_batch(examples, seq_len=4)
    assert inputs.tolist() == [[3, 4, 5, 6], [8, 0, 0, 0]]  # the oldest context tokens dropped to fit
    assert targets[mask].tolist() == [6, 7, 9]
    assert mask.tolist() == [[False, False, True, True], [True, False, False, False]]


def test_a_model_that_always_predicts_the_target_scores_100_percent_and_perplexity_one():
    examples = [(list(range(s, s + 10)), list(range(s + 10, s + 10 + n))) for s, n in [(0, 1), (50, 3), (295, 4)]]
    examples = [([t % 300 for t in c], [t % 300 for t in w]) for c, w in examples]
    task = TaskConfig(seq_len=32, micro_batch=2)
    perfect = lambada.evaluate(NextTokenOracle(300), task, {"examples": examples})
    assert perfect["accuracy"] == 1.0 and perfect["ppl"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["target_tokens"] == 8
    wrong = lambada.evaluate(NextTokenOracle(300, shift=2), task, {"examples": examples})
    assert wrong["accuracy"] == 0.0 and wrong["loss"] == pytest.approx(100.0, rel=1e-4)


def _evaluate(directory: Path, examples, out: Path | None, expected: dict | None):
    model = common.load_model(directory, state.current(), torch.device("cpu"))
    results = lambada.evaluate(model, TaskConfig(seq_len=32, micro_batch=3), {"examples": examples})
    if out is not None:
        torch.save(results, out)
    if expected is not None:
        assert results["accuracy"] == expected["accuracy"]
        assert results["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_tp2_evaluation_equals_tp1(tmp_path):
    cfg = ModelConfig(name="eval", hidden=64, heads=4, layers=2, vocab_size=300, seq_len=32)
    model = GPTModel(cfg, seed=2)
    meta = {"tp": 1, "dp": 1, "model": vars(cfg)}
    directory = checkpoint.save_all(tmp_path, 0, [{"iteration": 0, "model": model.state_dict()}], meta)
    generator = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, 300, (12,), generator=generator).tolist(), [7, 7]) for _ in range(7)]
    with torch.no_grad():  # make some predictions right, so accuracy is not trivially 0 at both degrees
        logits = model.eval()(torch.tensor([c + t[:1] for c, t in examples]))
    examples = [(c, [int(logits[i, -2, :300].argmax())]) for i, (c, _) in enumerate(examples)]
    _evaluate(directory, examples, tmp_path / "tp1.pt", None)
    expected = torch.load(tmp_path / "tp1.pt")
    assert expected["accuracy"] == 1.0
    run_on_ranks(2, _evaluate, directory, examples, None, expected)


def test_local_jsonl_and_a_missing_file(tmp_path):
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one two", "three four five"]))
    assert common.read_texts(TaskConfig(source=str(path))) == ["one two", "three four five"]
    from megatron_exp.config import ConfigError

    with pytest.raises(ConfigError, match=r"task.source=.*nope.jsonl is not a file"):
        common.read_texts(TaskConfig(source=str(tmp_path / "nope.jsonl")))
