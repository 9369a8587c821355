"""RACE: input building on hand-checked examples, the local layout, and pretrain -> fine-tune end to end."""

import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from megatron_exp.config import (
    ConfigError,
    HardwareConfig,
    LoggerConfig,
    ModelConfig,
    ParallelConfig,
    RaceConfig,
    RaceTaskConfig,
    TokenizerConfig,
)
from megatron_exp.data.bert_dataset import Vocabulary
from megatron_exp.data.tokenizer import wordpiece
from megatron_exp.tasks.race import (
    Question,
    encode_question,
    model_inputs,
    prepare,
    question_with_option,
    read_questions,
)
from megatron_exp.training import checkpoint
from tests.tasks.test_entry_points import evaluate
from tests.test_train import records, train

WORDS = ["the", "cat", "sat", "on", "mat", "?", ".", "dog", "ran", "to", "park", "what", "did", "do"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "_"]) + "\n")
    return wordpiece(TokenizerConfig(kind="wordpiece", vocab_file=str(vocab)), [])


def ids(*words: str) -> list[int]:
    return [5 + WORDS.index(w) for w in words]


CLS, SEP, PAD = 2, 3, 0


def test_blank_is_replaced_by_the_option_else_the_option_follows():
    assert question_with_option("The cat sat on the _ .", "mat") == "The cat sat on the mat ."
    assert question_with_option("Where is the cat?", "on the mat") == "Where is the cat? on the mat"


def test_sequences_are_cls_qa_sep_article_sep_with_token_types(tokenizer):
    q = Question("The dog ran to the park.", "The dog ran to the _ .", ["park", "mat", "cat", "dog"], 0, "middle")
    tokens, lengths, segment_b = encode_question(q, tokenizer, Vocabulary.of(tokenizer), seq_len=20, max_qa_len=16)
    article = ids("the", "dog", "ran", "to", "the", "park", ".")
    first = [CLS, *ids("the", "dog", "ran", "to", "the", "park", "."), SEP, *article, SEP]
    assert tokens[0].tolist() == first + [PAD] * (20 - len(first))
    assert lengths[0] == len(first) and segment_b[0] == 9
    assert tokens[1, 1:8].tolist() == ids("the", "dog", "ran", "to", "the", "mat", ".")

    inputs = model_inputs({"ids": tokens[None], "lengths": lengths[None], "segment_b": segment_b[None]}, [0])
    assert inputs["tokens"].shape == (1, 4, 20)
    assert inputs["token_types"][0, 0].tolist() == [0] * 9 + [1] * 8 + [0] * 3  # B = article + its [SEP]
    assert inputs["padding_mask"][0, 0].tolist() == [True] * 17 + [False] * 3


def test_truncation_cuts_qa_to_max_and_the_article_to_fit_keeping_sep_last(tokenizer):
    article = "the cat sat on the mat . " * 20
    q = Question(article, "what did the cat do ?", ["sat on the mat"] * 4, 2, "high")
    tokens, lengths, segment_b = encode_question(q, tokenizer, Vocabulary.of(tokenizer), seq_len=16, max_qa_len=6)
    row = tokens[0].tolist()
    qa, article = ids("what", "did", "the", "cat", "do", "?"), ids("the", "cat", "sat", "on", "the", "mat", ".")
    assert row == [CLS, *qa, SEP, *article, SEP]
    assert lengths.tolist() == [16] * 4 and segment_b.tolist() == [8] * 4


def _race_file(path, article, questions, options, answers, name):
    path.mkdir(parents=True, exist_ok=True)
    item = {"article": article, "questions": questions, "options": options, "answers": answers, "id": name}
    (path / name).write_text(json.dumps(item))


def _learnable_race(root, questions_per_split: dict[str, int], right: list[str], wrong: list[str], seed: int = 0):
    """Questions whose right option always comes from `right` and whose wrong ones from `wrong`, at random
    positions, with one fixed article: learnable from the options alone."""
    rng = np.random.default_rng(seed)
    for split, count in questions_per_split.items():
        for i in range(count):
            options = [str(w) for w in rng.choice(wrong, size=3, replace=False)]
            answer = int(rng.integers(4))
            options.insert(answer, str(rng.choice(right)))
            level = "middle" if i % 2 else "high"
            article = "Each question has one option from the first group of words. People read it every day."
            _race_file(root / split / level, article, ["Which word is from the first group?"], [options],
                       ["ABCD"[answer]], f"{level}{i}.txt")  # fmt: skip


COLOURS, NUMBERS = ["red", "blue", "green", "yellow"], ["one", "two", "three", "four", "five", "six"]


def test_local_race_layout_is_read_with_levels_and_answers(tmp_path):
    _learnable_race(tmp_path, {"train": 6, "dev": 4, "test": 2}, COLOURS, NUMBERS)
    cfg = RaceConfig(checkpoint="x", task=RaceTaskConfig(source=str(tmp_path)))
    splits = read_questions(cfg)
    assert {s: len(q) for s, q in splits.items()} == {"train": 6, "dev": 4, "test": 2}
    q = splits["train"][0]
    assert len(q.options) == 4 and q.options[q.answer] in COLOURS and q.level in ("middle", "high")
    assert {q.level for q in splits["dev"]} == {"middle", "high"}
    cfg.task.level = "middle"
    assert {q.level for q in read_questions(cfg)["dev"]} == {"middle"}
    with pytest.raises(ConfigError, match="no train folder"):
        read_questions(RaceConfig(checkpoint="x", task=RaceTaskConfig(source=str(tmp_path / "dev"))))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"is empty"),
        (b"\x89PNG\r\n", r"is not UTF-8 text"),
        (b'{"article": "a", "questions": ["q"]', r"is not valid JSON \(line 1"),
        (b'{"article": "a", "questions": ["q"], "options": [["1", "2", "3", "4"]]}', r"has no field 'answers'"),
        (b'{"article": "a", "questions": ["q"], "options": [["1", "2", "3", "4"]], "answers": ["E"]}', r"one of A"),
    ],
)
def test_a_bad_race_file_is_one_line_naming_it(tmp_path, content, message):
    _learnable_race(tmp_path, {"train": 2, "dev": 2, "test": 2}, COLOURS, NUMBERS)
    bad = next((tmp_path / "train").rglob("*.txt"))
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as error:
        read_questions(RaceConfig(checkpoint="x", task=RaceTaskConfig(source=str(tmp_path))))
    assert "task.source" in str(error.value) and bad.name in str(error.value) and "\n" not in str(error.value)


def _bert_run(run_dir, tokenizer, seq_len: int = 64):
    """What prepare() reads of a BERT run: its checkpoint's meta.json and its tokenizer (no weights are loaded)."""
    model = ModelConfig(name="bert", arch="bert", hidden=32, heads=4, layers=1, vocab_size=64, seq_len=seq_len)
    checkpoint.save_all(run_dir, 1, [{"iteration": 1, "model": {}}], {"tp": 1, "dp": 1, "model": asdict(model)})
    tokenizer.save(str(run_dir / "tokenizer.json"))
    return run_dir


def _race_config(run_dir, source, **task) -> RaceConfig:
    cpu = HardwareConfig(name="cpu", device="cpu", backend="gloo", precision="fp32", peak_tflops=1.0)
    task = RaceTaskConfig(source=str(source), **task)
    parallel = ParallelConfig(micro_batch=4)  # as conf/race.yaml sets it
    return RaceConfig(str(run_dir), task=task, parallel=parallel, hardware=cpu, logger=LoggerConfig(wandb=False))


def test_sequence_lengths_and_the_batch_default_to_what_the_model_and_the_data_allow(tmp_path, tokenizer):
    run = _bert_run(tmp_path / "bert", tokenizer, seq_len=64)
    for questions, batch in {40: (4, 16), 6: (4, 4), 3: (3, 3)}.items():  # questions: (micro, global batch)
        race = tmp_path / f"race{questions}"
        _learnable_race(race, {"train": questions, "dev": 2, "test": 2}, COLOURS, NUMBERS)
        spec = prepare(_race_config(run, race), str(tmp_path / f"job{questions}"), joined=False)
        task, par = spec.config.task, spec.config.parallel
        assert (task.seq_len, task.max_qa_len) == (64, 16)  # the model's positions; a quarter of them for qa
        assert (par.micro_batch, par.global_batch) == batch  # the paper's 16, or whole micro-batches of fewer
        assert np.load(spec.inputs["splits"]["train"])["ids"].shape == (questions, 4, 64)


def test_every_problem_is_reported_at_once_each_with_its_fix(tmp_path, tokenizer):
    run = _bert_run(tmp_path / "bert", tokenizer, seq_len=64)
    _learnable_race(tmp_path / "race", {"train": 6, "dev": 2, "test": 2}, COLOURS, NUMBERS)
    cfg = _race_config(run, tmp_path / "race", seq_len=1000, max_qa_len=2000)
    cfg.parallel = ParallelConfig(tp=3, dp=2, micro_batch=4, global_batch=7)
    with pytest.raises(ConfigError) as refused:
        prepare(cfg, str(tmp_path / "job"), joined=False)
    header, *problems = str(refused.value).splitlines()
    assert header == "RACE cannot start (6 problems):"
    keys = ["model.heads=4", "parallel.dp=2", "task.seq_len=1000", "task.max_qa_len=2000", "parallel.global_batch=7"]
    assert [re.split("[ :]", p.removeprefix("  - "))[0] for p in problems] == [*keys, "parallel.global_batch=7"]
    assert all(re.search(r"[:;] (set|use) ", p) for p in problems), problems  # each says what to change
    assert "at most 60" in problems[3] and "at most 6" in problems[5]  # what the model and the data leave room for
    assert not (tmp_path / "job" / "inputs").exists()  # refused before tokenizing anything


def test_sequence_parallelism_needs_task_seq_len_divisible_by_tp(tmp_path, tokenizer):
    run = _bert_run(tmp_path / "bert", tokenizer, seq_len=64)
    _learnable_race(tmp_path / "race", {"train": 6, "dev": 2, "test": 2}, COLOURS, NUMBERS)
    cfg = _race_config(run, tmp_path / "race", seq_len=63)
    cfg.parallel = ParallelConfig(tp=2, micro_batch=4, sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"^task.seq_len=63 is not divisible by parallel.tp=2, which .* set "
                                          r"task.seq_len=62 or 64, or parallel.sequence_parallel=false$"):  # fmt: skip
        prepare(cfg, str(tmp_path / "job"), joined=False)
    cfg.task.seq_len = 64
    assert prepare(cfg, str(tmp_path / "job"), joined=False).config.parallel.sequence_parallel


def test_the_command_lists_the_problems_and_exits_2_before_any_worker(tmp_path, tokenizer):
    run = _bert_run(tmp_path / "bert", tokenizer, seq_len=64)
    _learnable_race(tmp_path / "race", {"train": 6, "dev": 2, "test": 2}, COLOURS, NUMBERS)
    done = evaluate("race", tmp_path / "job", f"checkpoint={run}", f"task.source={tmp_path / 'race'}",
                    "task.seq_len=100", "parallel.global_batch=7", "hardware.peak_tflops=1")  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("error: RACE cannot start (3 problems):"), output
    assert output.count("\n  - ") == 3 and "task.seq_len=100 exceeds the model's 64 positions" in output
    assert not (tmp_path / "job" / "logs").exists()


BERT_TINY = [
    "model=bert_tiny",
    "data.seq_len=64",
    "model.seq_len=64",
    "parallel.micro_batch=8",
    "train.log_interval=5",
    "train.eval_interval=0",
    "train.eval_iters=2",
    "train.test_iters=1",
    "optimizer.lr=2e-3",
    "optimizer.warmup_iters=5",
]


@pytest.mark.slow
def test_pretrain_tiny_bert_then_fine_tune_on_race(tmp_path, shared_cache):
    pretrained = tmp_path / "bert"
    done = train(pretrained, *BERT_TINY, "train.iterations=60", cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [r["train/loss"] for r in records(pretrained) if "train/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # MLM + SOP loss falls
    final = json.loads((pretrained / "results.json").read_text())
    assert {"valid/mlm_loss", "valid/sop_loss", "valid/sop_accuracy", "test/loss"} <= set(final)
    assert final["valid/ppl"] == pytest.approx(math.exp(final["valid/mlm_loss"]))

    # Options of one whole-word token each, so every option's sequence has the same length: only what the
    # option is can tell the right one. A control run with lr=1e-12 (lr must be positive) measures the model before
    # fine-tuning: its weights do not move, so one epoch measures it as well as more would. The fine-tuned runs reach
    # full dev and test accuracy within their first epoch; a second one checks that training goes on past an epoch's
    # evaluation and checkpoint, and that the newest epoch's weights are the ones kept.
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    words = sorted(t for t in tokenizer.get_vocab() if t.isalpha() and t.islower() and len(t) >= 4)[:16]
    race = tmp_path / "race"
    _learnable_race(race, {"train": 64, "dev": 32, "test": 32}, right=words[:4], wrong=words[4:])
    accuracy = {}
    for lr, sp, epochs in ((1e-12, False, 1), (3e-3, True, 2), (3e-3, False, 2)):  # and with sequence parallelism
        finetuned = tmp_path / f"finetuned-lr{lr}-sp{sp}"
        done = evaluate("race", finetuned, f"checkpoint={pretrained}", f"task.source={race}", "task.seq_len=64",
                        "task.max_qa_len=24", f"task.epochs={epochs}", f"optimizer.lr={lr}", "parallel.tp=2",
                        "parallel.micro_batch=4", "parallel.global_batch=8", "log_interval=4",
                        f"parallel.sequence_parallel={sp}")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads((finetuned / "results.json").read_text())
        assert results["tp"] == 2 and results["epoch"] == epochs and results["test/questions"] == 32
        assert 0 <= results["test/accuracy_middle"] <= 1 and 0 <= results["test/accuracy_high"] <= 1
        accuracy[lr, sp] = results["dev/accuracy"], results["test/accuracy"]
    for sp in (False, True):  # chance: 0.25
        learned = min(accuracy[3e-3, sp])
        assert learned >= 0.75 and learned > max(accuracy[1e-12, False]) + 0.2, accuracy
    assert len(list((finetuned / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    saved = checkpoint.resolve(finetuned)  # the last epoch's fine-tuned weights, one shard per TP rank
    assert checkpoint.read_meta(saved)["epoch"] == 2 and checkpoint.read_meta(saved)["tp"] == 2
    assert "score.weight" in checkpoint.load_rank(saved, 1)["model"]
    assert "job_type: finetune" in (finetuned / "config.yaml").read_text()
    assert "dev acc" in done.stdout + done.stderr

    # fp16 fine-tuning scales the loss (one epoch: fp16 autocast is slow on CPU)
    fp16 = tmp_path / "finetuned-fp16"
    done = evaluate("race", fp16, f"checkpoint={pretrained}", f"task.source={race}", "task.seq_len=64",
                    "task.max_qa_len=24", "task.epochs=1", "optimizer.lr=3e-3", "hardware.precision=fp16",
                    "parallel.micro_batch=4", "parallel.global_batch=8", "log_interval=4")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    logged = [r for r in records(fp16) if "train/loss" in r]
    assert len(logged) == 2 and all(r["train/loss_scale"] == 2.0**16 and r["train/skipped_steps"] == 0 for r in logged)
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 for r in logged)


@pytest.mark.slow
def test_post_ln_and_pre_ln_bert_both_train_and_differ(tmp_path, shared_cache):
    losses = {}
    for layernorm in ("pre", "post"):
        run_dir = tmp_path / layernorm
        done = train(run_dir, *BERT_TINY, f"model.layernorm={layernorm}", "train.iterations=10",
                     "logger.wandb=false", cache=shared_cache)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        losses[layernorm] = [r["train/loss"] for r in records(run_dir) if "train/loss" in r]
        assert all(math.isfinite(loss) for loss in losses[layernorm])
    assert losses["pre"] != losses["post"]


@pytest.mark.slow
def test_race_refuses_a_gpt_checkpoint(tmp_path, shared_cache):
    gpt = tmp_path / "gpt"
    done = train(gpt, "model=gpt_tiny", "data.seq_len=32", "train.iterations=1", "train.eval_iters=1",
                 "train.test_iters=1",
                 "parallel.micro_batch=2", "logger.wandb=false", cache=shared_cache)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    done = evaluate("race", tmp_path / "race", f"checkpoint={gpt}", f"task.source={tmp_path}")
    assert done.returncode == 2 and "RACE fine-tunes a BERT" in done.stdout + done.stderr


def test_scores_come_from_the_pooled_cls_state():
    from megatron_exp.config import ModelConfig
    from megatron_exp.models.bert import BERTMultipleChoice

    cfg = ModelConfig(arch="bert", hidden=32, heads=4, layers=1, vocab_size=50, seq_len=8)
    model = BERTMultipleChoice(cfg, seed=0).eval()
    tokens = torch.randint(5, 50, (2, 4, 8))
    scores = model(tokens, torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool))
    assert scores.shape == (2, 4)
    one = tokens[1, 2:3]
    expected = model.score(model.bert.pool(model.bert.encode(one, torch.zeros_like(one), torch.ones_like(one) > 0)))
    torch.testing.assert_close(scores[1, 2], expected.squeeze())
    tokens[1, 2, 3] += 1  # another question's scores do not move
    assert torch.equal(model(tokens, torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool))[0], scores[0])
