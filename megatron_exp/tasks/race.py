"""`python -m megatron_exp.tasks.race checkpoint=...`: fine-tune a BERT checkpoint on RACE reading comprehension.

Each question becomes 4 sequences, one per option: `[CLS] qa [SEP] article [SEP]`, where qa is the question with
its blank `_` replaced by the option (or question + ' ' + option when there is no blank), cut to task.max_qa_len
tokens; the article fills the rest of task.seq_len. Token types are 0 up to the first [SEP], 1 after. The model
scores each sequence from its pooled [CLS] state, a softmax over the 4 scores gives the answer, and training
minimizes the cross-entropy (the paper's recipe: 3 epochs, lr 1e-5..2e-5 with warmup, weight decay).

Reports accuracy on dev and test, overall and for the middle- and high-school parts, after every epoch, to
metrics.jsonl and W&B (job_type=finetune), and the final numbers to results.json. The fine-tuned weights are
saved after every epoch under <run_dir>/checkpoints (TP shards, the newest epoch kept).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from megatron_exp import console, entry, hardware
from megatron_exp.config import ConfigError, ModelConfig, ParallelConfig, RaceConfig, RunSpec, check_ranges
from megatron_exp.data import files
from megatron_exp.data.bert_dataset import Vocabulary
from megatron_exp.data.gpt_dataset import SampleOrder
from megatron_exp.data.tokenizer import BERT_SPECIAL_TOKENS
from megatron_exp.hardware import device_of
from megatron_exp.models.bert import BERTMultipleChoice
from megatron_exp.models.contract import Batch
from megatron_exp.parallel import random, state
from megatron_exp.preflight import sequence_parallel_problem
from megatron_exp.tasks.common import load_tokenizer
from megatron_exp.training import checkpoint, flops
from megatron_exp.training.loop import Cadence, Cost, TrainingLoop
from megatron_exp.training.metrics import wandb_settings
from megatron_exp.training.schedule import MicroBatches

log = logging.getLogger("megatron_exp.tasks.race")

SPLITS = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}
LEVELS = ("middle", "high")
OPTIONS = 4


@dataclass
class Question:
    article: str
    question: str
    options: list[str]
    answer: int  # index of the right option
    level: str  # middle | high


def _level_of(example_id: str) -> str:
    """RACE ids and file names start with the level: middle123.txt, high4567.txt."""
    return "middle" if Path(example_id).name.startswith("middle") else "high"


def _from_local(directory: Path, split: str, level: str) -> list[Question]:
    folder = next((directory / name for name in SPLITS[split] if (directory / name).is_dir()), None)
    if folder is None:
        raise ConfigError(
            f"task.source={directory} has no {split} folder: expected the RACE layout "
            "{train,dev,test}/{middle,high}/*.txt"
        )
    questions = []
    for file in sorted(p for lv in LEVELS if level in ("all", lv) for p in (folder / lv).glob("*.txt")):
        item = files.read_json(file, "task.source", ("article", "questions", "options", "answers"))
        counts = {name: len(item[name]) for name in ("questions", "options", "answers")}
        if len(set(counts.values())) != 1 or any(a not in ("A", "B", "C", "D") for a in item["answers"]):
            raise ConfigError(
                f"task.source: {file} needs as many questions, option lists and answers (has {counts}), each answer "
                "one of A, B, C, D"
            )
        for question, options, answer in zip(item["questions"], item["options"], item["answers"], strict=True):
            questions.append(Question(item["article"], question, options, "ABCD".index(answer), _level_of(file.name)))
    return questions


def _from_hub(name: str, split: str, level: str) -> list[Question]:
    from datasets import load_dataset  # here: importing datasets adds ~0.5 s to every process's start

    try:
        rows = load_dataset(name, level, split=SPLITS[split][0])
    except Exception as error:
        raise ConfigError(
            f"task.source=hub:{name} could not be loaded from the hub ({type(error).__name__}); check the name, "
            "task.level and the network, or point task.source at a local RACE directory"
        ) from error
    return [
        Question(r["article"], r["question"], list(r["options"]), "ABCD".index(r["answer"]), _level_of(r["example_id"]))
        for r in rows
    ]


def read_questions(cfg: RaceConfig) -> dict[str, list[Question]]:
    task = cfg.task
    if task.source.startswith("hub:"):
        splits = {split: _from_hub(task.source.removeprefix("hub:"), split, task.level) for split in SPLITS}
    else:
        directory = Path(task.source).expanduser()
        if not directory.is_dir():
            raise ConfigError(f"task.source={task.source} is not a directory: give a RACE directory or hub:ehovy/race")
        splits = {split: _from_local(directory, split, task.level) for split in SPLITS}
    for split, questions in splits.items():
        if not questions:
            raise ConfigError(f"task.source={task.source} has no {split} questions (task.level={task.level})")
        if any(len(q.options) != OPTIONS for q in questions):
            raise ConfigError(f"task.source={task.source}: every {split} question needs {OPTIONS} options")
    return {split: questions[: task.max_questions] for split, questions in splits.items()}


def question_with_option(question: str, option: str) -> str:
    return question.replace("_", option) if "_" in question else f"{question} {option}"


def encode_question(
    q: Question, tokenizer: Tokenizer, vocab: Vocabulary, seq_len: int, max_qa_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [4, seq_len] padded, lengths [4], first position of segment B [4]) for one question."""
    article = tokenizer.encode(q.article).ids
    ids = np.full((OPTIONS, seq_len), vocab.pad, dtype=np.int64)
    lengths, segment_b = np.zeros(OPTIONS, dtype=np.int64), np.zeros(OPTIONS, dtype=np.int64)
    for i, option in enumerate(q.options):
        qa = tokenizer.encode(question_with_option(q.question, option)).ids[:max_qa_len]
        room = seq_len - 3 - len(qa)
        row = [vocab.cls, *qa, vocab.sep, *article[:room], vocab.sep]
        ids[i, : len(row)] = row
        lengths[i], segment_b[i] = len(row), len(qa) + 2
    return ids, lengths, segment_b


def encode_split(questions: list[Question], tokenizer: Tokenizer, cfg: RaceConfig) -> dict[str, np.ndarray]:
    vocab = Vocabulary.of(tokenizer)
    encoded = [encode_question(q, tokenizer, vocab, cfg.task.seq_len, cfg.task.max_qa_len) for q in questions]
    ids, lengths, segment_b = (np.stack(parts) for parts in zip(*encoded, strict=True))
    return {
        "ids": ids.astype(np.int32),
        "lengths": lengths,
        "segment_b": segment_b,
        "answers": np.array([q.answer for q in questions]),
        "high": np.array([q.level == "high" for q in questions]),
    }


def model_inputs(split: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The model's inputs [len(rows), 4, seq_len] for questions `rows` of an encoded split."""
    ids = torch.from_numpy(split["ids"][rows].astype(np.int64))
    position = torch.arange(ids.shape[-1])
    lengths = torch.from_numpy(split["lengths"][rows])[..., None]
    segment_b = torch.from_numpy(split["segment_b"][rows])[..., None]
    padding_mask = position < lengths
    token_types = ((position >= segment_b) & padding_mask).long()
    return {"tokens": ids, "token_types": token_types, "padding_mask": padding_mask}


class FineTuning:
    """The training core's work: the multiple-choice model at this TP degree, the train questions in a seeded order
    per epoch, accuracy on dev and test after every epoch."""

    def __init__(self, cfg: RaceConfig, pretrained: Path, inputs: Mapping[str, str], grid: state.ProcessGrid):
        self.cfg, self.pretrained, self.shows_progress = cfg, pretrained, grid.rank == 0
        model_cfg = checkpoint.model_config_of(pretrained)
        with torch.device(device_of(cfg.hardware)):
            self.model = BERTMultipleChoice(
                model_cfg, grid.tp, recompute=cfg.parallel.recompute, seed=cfg.seed,
                sequence_parallel=cfg.parallel.sequence_parallel,
            )  # fmt: skip
        weights = checkpoint.load_model_state(pretrained, self.model.bert, grid)
        encoder = {name: weights[name] for name in self.model.bert.state_dict() if name in weights}
        checkpoint.load_into(self.model.bert, encoder, pretrained, "model")  # the pretraining heads stay behind
        self.splits = {split: dict(np.load(path)) for split, path in inputs.items()}
        par = cfg.parallel
        self.questions = len(self.splits["train"]["answers"])
        self.steps_per_epoch = self.questions // par.global_batch
        self.order = SampleOrder(self.questions, cfg.seed)
        sequences = par.global_batch * OPTIONS
        shape = (sequences, cfg.task.seq_len, model_cfg.layers, model_cfg.hidden, 0)  # no vocabulary layer
        self.cost = Cost(
            tokens=sequences * cfg.task.seq_len,
            model_flops=flops.model_flops(*shape),
            executed_flops=flops.hardware_flops(*shape, par.recompute),
        )

    def describe(self) -> str:
        par, task = self.cfg.parallel, self.cfg.task
        return (
            f"RACE: {self.questions} train questions, {self.steps_per_epoch} steps per epoch of {par.global_batch} "
            f"questions (micro batch {par.micro_batch}), {task.epochs} epochs; sequences of {task.seq_len} tokens, "
            f"question + option up to {task.max_qa_len}"
        )

    def micro_batches(self, iteration: int) -> list[Batch]:
        """Step k of an epoch takes questions [k G, (k + 1) G) of that epoch's permutation (the rest is dropped)."""
        epoch, k = divmod(iteration - 1, self.steps_per_epoch)
        par, train = self.cfg.parallel, self.splits["train"]
        first = epoch * self.questions + k * par.global_batch
        rows = np.array([self.order.sample_index(first + i) for i in range(par.global_batch)])
        return [
            Batch(model_inputs(train, part), {"answers": torch.from_numpy(train["answers"][part])})
            for part in np.split(rows, par.global_batch // par.micro_batch)
        ]

    @torch.no_grad()
    def accuracy(self, split: str, autocast) -> dict[str, float | None]:
        """Accuracy overall, on middle and on high questions (None for a level with no questions)."""
        self.model.eval()
        data, micro = self.splits[split], self.cfg.parallel.micro_batch
        hits, firsts = [], range(0, len(data["answers"]), micro)
        for first in console.progress(firsts, desc=f"RACE {split}", unit="batches", enabled=self.shows_progress):
            rows = np.arange(first, min(first + micro, len(data["answers"])))
            inputs = {name: t.to(self.model.device) for name, t in model_inputs(data, rows).items()}
            with autocast():
                scores = self.model(**inputs)
            hits.append(scores.argmax(-1).cpu().numpy() == data["answers"][rows])
        self.model.train()
        hits = np.concatenate(hits)
        high = data["high"]
        result = {f"{split}/accuracy": float(hits.mean()), f"{split}/questions": len(hits)}
        for level, members in (("middle", ~high), ("high", high)):
            result[f"{split}/accuracy_{level}"] = float(hits[members].mean()) if members.any() else None
        return result

    def evaluate(self, iteration: int, final: bool, schedule: MicroBatches) -> dict:
        epoch = {"epoch": iteration // self.steps_per_epoch}
        return epoch | self.accuracy("dev", schedule.autocast) | self.accuracy("test", schedule.autocast)

    def checkpoint_meta(self, iteration: int) -> dict:
        return {"task": "race", "fine_tuned_from": str(self.pretrained), "epoch": iteration // self.steps_per_epoch}


def fine_tune(spec: RunSpec[RaceConfig], grid: state.ProcessGrid) -> dict:
    """One rank: fine-tune for task.epochs, evaluating and saving the weights after every epoch (the newest kept,
    so a long run loses at most an epoch)."""
    cfg = spec.config
    random.seed(cfg.seed, grid.tp.rank, device_of(cfg.hardware))
    work = FineTuning(cfg, Path(spec.inputs["checkpoint"]), spec.inputs["splits"], grid)
    epoch = work.steps_per_epoch
    cadence = Cadence(cfg.task.epochs * epoch, cfg.log_interval, eval_interval=epoch, checkpoint_interval=epoch, keep=1)
    loop = TrainingLoop(work, grid, optimizer=cfg.optimizer, hardware=cfg.hardware, cadence=cadence,
                        run_dir=spec.run_dir, wandb=spec.wandb if grid.rank == 0 else None)  # fmt: skip
    if grid.rank == 0:
        log.info(work.describe())
    return loop.run()


QA_SHARE = 4  # task.max_qa_len defaults to seq_len / 4: the paper's 128 of 512
PAPER_BATCH = 16  # questions per step when parallel.global_batch is null (the paper: 16-32)


def model_problems(cfg: RaceConfig, model: ModelConfig) -> list[str]:
    """What keeps the checkpoint's model from running this config, each with its fix (task.seq_len and
    task.max_qa_len resolved)."""
    task, par, problems = cfg.task, cfg.parallel, []
    if model.arch != "bert":
        problems.append(
            f"checkpoint={cfg.checkpoint} holds a {model.arch} model: RACE fine-tunes a BERT (e.g. one trained with "
            "python -m megatron_exp.train model=bert_tiny)"
        )
    try:
        model.validate(par.tp)
    except ConfigError as error:
        problems.append(str(error))
    if par.dp not in (None, 1):
        problems.append(f"parallel.dp={par.dp}: RACE fine-tuning runs on TP ranks only; use parallel.dp=1")
    if par.pp != 1:
        problems.append(
            f"parallel.pp={par.pp}: RACE fine-tuning runs on TP ranks only (a checkpoint of any pipeline layout "
            "loads); use parallel.pp=1"
        )
    problem = sequence_parallel_problem(par, task.seq_len, "task.seq_len")
    if problem:
        problems.append(problem)
    if task.seq_len > model.seq_len:
        problems.append(
            f"task.seq_len={task.seq_len} exceeds the model's {model.seq_len} positions: set task.seq_len to at "
            f"most {model.seq_len}, or leave it null (the model's)"
        )
    room = min(task.seq_len, model.seq_len) - 4  # [CLS] qa [SEP], then at least one article token and [SEP]
    if task.max_qa_len > room:
        fix = f"set task.max_qa_len to at most {room}" if room > 0 else "raise task.seq_len"
        problems.append(
            f"task.max_qa_len={task.max_qa_len} leaves no room for the article in task.seq_len={task.seq_len}: {fix}"
            ", or leave it null (a quarter of task.seq_len)"
        )
    return problems


def tokenizer_problems(tokenizer: Tokenizer, model: ModelConfig) -> list[str]:
    problems = []
    missing = [token for token in BERT_SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    if missing:
        problems.append(f"the tokenizer lacks {', '.join(missing)}: set tokenizer= to the BERT's WordPiece tokenizer")
    if tokenizer.get_vocab_size() > model.vocab_size:
        problems.append(
            f"the tokenizer has {tokenizer.get_vocab_size()} entries, more than the model's {model.vocab_size}: set "
            "tokenizer= to the tokenizer.json the BERT was trained with"
        )
    return problems


def fit_batch(par: ParallelConfig, train_questions: int) -> list[str]:
    """A null parallel.global_batch filled from the train split: the paper's 16 questions, or as many whole
    micro-batches as fewer questions fill (all of them in one micro-batch when they fill none). Else what does not
    fit, each with its fix."""
    if par.global_batch is None:
        if train_questions < par.micro_batch:
            par.micro_batch = train_questions
        par.global_batch = min(PAPER_BATCH, train_questions) // par.micro_batch * par.micro_batch
        return []
    problems = []
    if par.global_batch % par.micro_batch:
        problems.append(
            f"parallel.global_batch={par.global_batch} is not a multiple of parallel.micro_batch={par.micro_batch}: "
            f"set parallel.global_batch={max(1, par.global_batch // par.micro_batch) * par.micro_batch}, or leave it "
            "null"
        )
    if par.global_batch > train_questions:
        problems.append(
            f"parallel.global_batch={par.global_batch} is more than the {train_questions} train questions: set it to "
            f"at most {train_questions}, or leave it null"
        )
    return problems


def _collect(problems: list[str], read: Callable, *args):
    """`read(*args)`, or None with its ConfigError added to `problems`."""
    try:
        return read(*args)
    except ConfigError as error:
        problems.append(str(error))
        return None


def all_at_once(problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"RACE cannot start ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems))


def prepare(composed: RaceConfig, run_dir: str, joined: bool) -> RunSpec[RaceConfig]:
    """Fit the task to the checkpoint's model and the data (sequence lengths, batch), check everything and refuse
    with every problem at once, tokenize the questions: the job's spec."""
    cfg = copy.deepcopy(composed)
    check_ranges(cfg)
    directory = checkpoint.require(cfg.checkpoint, "checkpoint")
    model = checkpoint.model_config_of(directory)
    task, par = cfg.task, cfg.parallel
    task.seq_len = model.seq_len if task.seq_len is None else task.seq_len
    if task.max_qa_len is None:  # of the length that can run, so that a too long seq_len is the only problem
        task.max_qa_len = min(task.seq_len, model.seq_len) // QA_SHARE
    problems = model_problems(cfg, model)
    tokenizer = _collect(problems, load_tokenizer, cfg, directory, model)
    if tokenizer is not None:
        problems += tokenizer_problems(tokenizer, model)
    questions = _collect(problems, read_questions, cfg)
    if questions is not None:
        problems += fit_batch(par, len(questions["train"]))
    if not problems:
        steps = task.epochs * (len(questions["train"]) // par.global_batch)
        cfg.optimizer.warmup_iters = round(task.warmup_fraction * steps)
        cfg.optimizer.decay_iters = steps
        _collect(problems, cfg.optimizer.validate)
    if par.distributed_optimizer:
        problems.append("parallel.distributed_optimizer=true shards Adam over DP, but RACE runs at dp=1: leave it off")
    hardware_cfg = _collect(problems, hardware.resolve, cfg.hardware, par.tp, True)
    if problems:
        raise all_at_once(problems)
    par.dp, cfg.hardware = 1, hardware_cfg
    inputs_dir = Path(run_dir) / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, split_questions in questions.items():
        splits[split] = str(inputs_dir / f"{split}.npz")
        tokenized = console.progress(split_questions, desc=f"RACE {split}: tokenizing", unit="questions")
        np.savez(splits[split], **encode_split(tokenized, tokenizer, cfg))
    (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    wandb = wandb_settings(cfg.logger, run_dir, asdict(cfg), gpu=cfg.hardware.device == "cuda")
    inputs = {"checkpoint": str(directory), "splits": splits}
    return RunSpec(cfg, run_dir, workers=par.tp, joined=joined, wandb=wandb, inputs=inputs)


def report(spec: RunSpec[RaceConfig], results: dict) -> dict:
    results = {"task": "race", **results, "checkpoint": spec.inputs["checkpoint"], "tp": spec.config.parallel.tp}
    log.info("RACE results (%s):\n%s", Path(spec.run_dir) / "results.json", json.dumps(results, indent=2))
    return results


@entry.hydra_app("race")
def main(raw: DictConfig) -> dict | None:
    return entry.run(raw, RaceConfig, prepare, fine_tune, report)


if __name__ == "__main__":
    main()
