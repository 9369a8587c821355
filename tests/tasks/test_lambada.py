import json
import math
from pathlib import Path

import pytest
import torch

from megatron_exp.config import LambadaConfig, ModelConfig, TokenizerConfig
from megatron_exp.data.tokenizer import gpt2
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.tasks import common, lambada
from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.tasks.fixtures import NextTokenOracle, single_threaded

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
    texts = common.read_texts(LambadaConfig(source=str(SHARED / "lambada_test.jsonl")))
    assert len(texts) == 5153
    examples = lambada.encode(texts[:4], GPT2, strict=True)
    assert [GPT2.decode(target) for _, target in examples] == [" signs", " Shane", " insurance", " Helen"]
    assert GPT2.decode(examples[1][0]).endswith('"I can make it there on my own,')  # quote and comma kept


def test_only_examples_of_one_row_length_share_a_forward():
    examples = [([1] * n, [2]) for n in (4, 2, 4, 4, 2, 39)]  # row lengths 5, 3, 5, 5, 3 and 40 (cut to 33)
    assert lambada.batches(examples, seq_len=32, batch_size=2) == [[1, 4], [0, 2], [3], [5]]


def test_batches_mask_exactly_the_target_positions_and_truncate_old_context():
    examples = [([1, 2, 3, 4, 5], [6, 7]), ([8, 9, 10], [11, 12, 13, 14])]  # rows of 7, cut to seq_len + 1 = 5
    inputs, targets, mask = lambada.example_batch(examples, seq_len=4)
    assert inputs.tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]  # the oldest context tokens dropped to fit
    assert targets[mask].tolist() == [6, 7, 11, 12, 13, 14]
    assert mask.tolist() == [[False, False, True, True], [True, True, True, True]]


def test_an_oracle_gives_hand_computed_accuracy_and_perplexities_per_token_and_per_passage():
    """The oracle predicts token + 1 with certainty: a target token that follows that rule costs 0 nats, any other
    costs exactly 100 (its logit 0 against the prediction's 100)."""
    examples = [
        (list(range(0, 10)), [10]),  # right: 0
        (list(range(20, 30)), [30, 32, 33]),  # 0 + 100 + 0 = 100
        (list(range(40, 50)), [7, 7]),  # 100 + 100 = 200
        ([295, 296, 297, 298, 299, 0, 1, 2, 3, 4], [5, 6, 7, 8]),  # right, across the vocabulary's end: 0
    ]
    results = lambada.evaluate(
        common.TokenScores(NextTokenOracle(300)), LambadaConfig(seq_len=32, batch_size=2), {"examples": examples}
    )
    assert results["accuracy"] == 0.5 and results["examples"] == 4 and results["target_tokens"] == 10
    assert results["loss_per_token"] == pytest.approx(300 / 10) and results["ppl_per_token"] == pytest.approx(
        math.exp(30)
    )
    assert results["loss_per_passage"] == pytest.approx(300 / 4)  # lm-eval: exp(-mean passage log-likelihood)
    assert results["ppl_per_passage"] == pytest.approx(math.exp(75))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "lambada_test.jsonl").is_file(), reason="../shared/data is not present")
def test_batched_passages_score_bit_identically_to_one_at_a_time_on_the_real_test_set():
    texts = common.read_texts(LambadaConfig(source=str(SHARED / "lambada_test.jsonl")))[:150]  # a prefix: GPT-2's
    # vocabulary makes every forward cost 50K logits a position
    examples = lambada.encode(texts, GPT2, strict=True)
    model = GPTModel(ModelConfig(hidden=64, heads=4, layers=2, seq_len=128), seed=0).eval()  # GPT-2's vocabulary
    with single_threaded():
        one, batched = (
            lambada.evaluate(
                common.TokenScores(model), LambadaConfig(seq_len=128, batch_size=size), {"examples": examples}
            )
            for size in (1, 6)
        )
    assert one["examples"] == 150 and len(lambada.batches(examples, 128, 6)) < 150 / 2  # passages share forwards
    assert batched == one  # exactly: accuracy and both perplexities to the last bit


def _evaluate(directory: Path, examples, out: Path | None, expected: dict | None):
    model = common.load_model(directory, state.current(), torch.device("cpu"))
    results = lambada.evaluate(
        common.TokenScores(model), LambadaConfig(seq_len=32, batch_size=3), {"examples": examples}
    )
    if out is not None:
        torch.save(results, out)
    if expected is not None:
        assert results["accuracy"] == expected["accuracy"]
        assert results["loss_per_token"] == pytest.approx(expected["loss_per_token"], rel=1e-5)


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
    assert common.read_texts(LambadaConfig(source=str(path))) == ["one two", "three four five"]
    from megatron_exp.config import ConfigError

    with pytest.raises(ConfigError, match=r"task.source=.*nope.jsonl is not a file"):
        common.read_texts(LambadaConfig(source=str(tmp_path / "nope.jsonl")))
