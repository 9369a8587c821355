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

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from megatron_exp import hardware, launch
from megatron_exp.config import ConfigError, ModelConfig, RaceConfig, typed
from megatron_exp.data.bert_dataset import Vocabulary
from megatron_exp.models.bert import BERTMultipleChoice
from megatron_exp.parallel import random, state
from megatron_exp.tasks.common import load_tokenizer
from megatron_exp.training import checkpoint, flops
from megatron_exp.training.metrics import MetricSinks, wandb_settings
from megatron_exp.training.optim import DynamicLossScaler, build_optimizer, learning_rate, optimizer_step
from megatron_exp.training.trainer import device_of

log = logging.getLogger("megatron_exp.tasks.race")

ConfigStore.instance().store(name="race_schema", node=RaceConfig)

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
        item = json.loads(file.read_text(encoding="utf-8"))
        for question, options, answer in zip(item["questions"], item["options"], item["answers"], strict=True):
            questions.append(Question(item["article"], question, options, "ABCD".index(answer), _level_of(file.name)))
    return questions


def _from_hub(name: str, split: str, level: str) -> list[Question]:
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
    if task.level not in ("all", *LEVELS):
        raise ConfigError(f"task.level={task.level} is unknown: all, middle or high")
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


def model_inputs(split: dict[str, np.ndarray], rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs [len(rows), 4, seq_len] for questions `rows` of an encoded split."""
    ids = torch.from_numpy(split["ids"][rows].astype(np.int64))
    position = torch.arange(ids.shape[-1])
    lengths = torch.from_numpy(split["lengths"][rows])[..., None]
    segment_b = torch.from_numpy(split["segment_b"][rows])[..., None]
    padding_mask = position < lengths
    token_types = ((position >= segment_b) & padding_mask).long()
    inputs = {"tokens": ids, "token_types": token_types, "padding_mask": padding_mask}
    return {name: t.to(device) for name, t in inputs.items()}


class FineTuning:
    """One worker: the multiple-choice model at this TP degree, trained on train, measured on dev and test."""

    def __init__(self, cfg: RaceConfig, directory: Path, inputs: dict[str, Path], grid: state.ProcessGrid):
        self.cfg, self.grid = cfg, grid
        self.device = device_of(cfg.hardware)
        random.seed(cfg.seed, grid.tp.rank, self.device)
        model_cfg = checkpoint.model_config_of(directory)
        self.meta = {"world_size": grid.world_size, "tp": grid.tp.size, "dp": 1, "model": asdict(model_cfg),
                     "task": "race", "fine_tuned_from": str(directory), "weights_only": True}  # fmt: skip
        with torch.device(self.device):
            self.model = BERTMultipleChoice(model_cfg, grid.tp, seed=cfg.seed)
        pretrained = checkpoint.load_model_state(directory, grid.tp.size, grid.tp.rank)
        encoder = {name: pretrained[name] for name in self.model.bert.state_dict() if name in pretrained}
        checkpoint.load_into(self.model.bert, encoder, directory, "model")  # the pretraining heads stay behind
        self.parameters = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        dtype = hardware.AUTOCAST_DTYPES.get(cfg.hardware.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = DynamicLossScaler(self.device) if cfg.hardware.precision == "fp16" else None
        self.splits = {split: dict(np.load(path)) for split, path in inputs.items()}
        par = cfg.parallel
        self.steps_per_epoch = len(self.splits["train"]["answers"]) // par.global_batch
        self.total_steps = cfg.task.epochs * self.steps_per_epoch
        sequences = par.global_batch * OPTIONS
        self.flops = flops.model_flops(sequences, cfg.task.seq_len, model_cfg.layers, model_cfg.hidden, vocab=0)
        self.sinks = MetricSinks(Path(cfg.run_dir), self.total_steps, wandb_settings(cfg)) if grid.rank == 0 else None

    def _step(self, step: int, rows: np.ndarray) -> torch.Tensor:
        """One optimizer step on questions `rows`; returns [loss, accuracy, gradient norm (0 if skipped), 1 if fp16
        overflow skipped the step] on the device, so the step never waits for the host."""
        lr = learning_rate(self.cfg.optimizer, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self.cfg.parallel.micro_batch
        loss_sum, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for first in range(0, len(rows), micro):
            batch = rows[first : first + micro]
            with self.autocast():
                scores = self.model(**model_inputs(self.splits["train"], batch, self.device))
            answers = torch.from_numpy(self.splits["train"]["answers"][batch]).to(self.device)
            loss = F.cross_entropy(scores.float(), answers, reduction="sum") / len(rows)
            (loss * self.scaler.scale if self.scaler else loss).backward()
            loss_sum += loss.detach()
            correct += (scores.argmax(-1) == answers).sum()
        clip = self.cfg.optimizer.clip_grad
        norm, skipped = optimizer_step(self.optimizer, self.parameters, clip, self.grid, self.scaler)
        return torch.stack([loss_sum, correct / len(rows), norm, skipped])

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Accuracy overall, on middle and on high questions (NaN for a level with no questions)."""
        self.model.eval()
        data = self.splits[split]
        hits = []
        for first in range(0, len(data["answers"]), self.cfg.parallel.micro_batch):
            rows = np.arange(first, min(first + self.cfg.parallel.micro_batch, len(data["answers"])))
            with self.autocast():
                scores = self.model(**model_inputs(data, rows, self.device))
            hits.append(scores.argmax(-1).cpu().numpy() == data["answers"][rows])
        self.model.train()
        hits = np.concatenate(hits)
        high = data["high"]
        result = {f"{split}/accuracy": float(hits.mean()), f"{split}/questions": len(hits)}
        for level, members in (("middle", ~high), ("high", high)):
            result[f"{split}/accuracy_{level}"] = float(hits[members].mean()) if members.any() else math.nan
        return result

    def run(self) -> dict:
        cfg, par = self.cfg, self.cfg.parallel
        if self.sinks:
            log.info(
                "RACE: %d train questions, %d steps per epoch of %d questions (micro batch %d), %d epochs",
                len(self.splits["train"]["answers"]), self.steps_per_epoch, par.global_batch, par.micro_batch,
                cfg.task.epochs,
            )  # fmt: skip
        step, results = 0, {}
        sums, steps, start = torch.zeros(4, device=self.device), 0, time.perf_counter()  # the logging window
        for epoch in range(cfg.task.epochs):
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.splits["train"]["answers"]))
            for k in range(self.steps_per_epoch):
                step += 1
                sums += self._step(step, order[k * par.global_batch : (k + 1) * par.global_batch])
                steps += 1
                if step % cfg.log_interval == 0 or k == self.steps_per_epoch - 1:
                    seconds = (time.perf_counter() - start) / steps
                    self._log_train(step, steps, sums.tolist(), seconds)
                    sums, steps, start = sums.zero_(), 0, time.perf_counter()
            results = {"epoch": epoch + 1} | self.evaluate("dev") | self.evaluate("test")
            if self.sinks:
                self.sinks.log({"iteration": step, **results})
            # the fine-tuned weights after every epoch (the newest kept), so a long run loses at most an epoch
            state = {"iteration": step, "epoch": epoch + 1, "model": self.model.state_dict()}
            checkpoint.save(cfg.run_dir, step, state, self.grid.rank, self.meta | {"epoch": epoch + 1}, keep=1)
        if self.sinks:
            self.sinks.close()
        return results

    def _log_train(self, step: int, steps: int, sums: list[float], seconds: float) -> None:
        """Log the window's means over its `steps` (the gradient norm over the steps taken) and `seconds` per step."""
        par = self.cfg.parallel
        loss, accuracy, grad_norm, skipped = sums
        record = {
            "iteration": step,
            "train/loss": loss / steps,
            "train/accuracy": accuracy / steps,
            "train/lr": learning_rate(self.cfg.optimizer, step, self.total_steps),
            "train/grad_norm": grad_norm / max(1, steps - skipped),
            "perf/step_time_s": seconds,
            "perf/tokens_per_s": par.global_batch * OPTIONS * self.cfg.task.seq_len / seconds,
            "perf/tflops_per_device": self.flops / seconds / self.grid.world_size / 1e12,
        }
        if self.scaler:
            record |= {"train/skipped_steps": round(skipped), "train/loss_scale": self.scaler.scale.item()}
        peak = self.cfg.hardware.peak_tflops
        if peak:
            record["perf/mfu"] = flops.utilization(self.flops, seconds, self.grid.world_size, peak)
        if self.sinks:
            self.sinks.log(record)


def worker(payload: dict) -> dict | None:
    cfg = typed(RaceConfig, payload["config"])
    grid = launch.start_worker(cfg.hardware, cfg.parallel)
    try:
        inputs = {split: Path(path) for split, path in payload["inputs"].items()}
        results = FineTuning(cfg, Path(payload["checkpoint"]), inputs, grid).run()
        launch.finish_worker()
        return results if grid.rank == 0 else None
    finally:
        state.destroy()


def prepare(cfg: RaceConfig) -> tuple[Path, ModelConfig]:
    """Check the checkpoint is a BERT and the config can run; resolve the schedule and hardware."""
    directory = checkpoint.require(cfg.checkpoint, "checkpoint")
    model = checkpoint.model_config_of(directory)
    if model.arch != "bert":
        raise ConfigError(f"checkpoint={cfg.checkpoint} holds a {model.arch} model: RACE fine-tunes a BERT")
    model.validate(cfg.parallel.tp)
    if cfg.parallel.dp not in (None, 1):
        raise ConfigError(f"parallel.dp={cfg.parallel.dp}: RACE fine-tuning runs on TP ranks only; use parallel.dp=1")
    cfg.parallel.dp = 1
    par = cfg.parallel
    if par.global_batch is None:
        par.global_batch = par.micro_batch
    if par.global_batch % par.micro_batch:
        raise ConfigError(
            f"parallel.global_batch={par.global_batch} is not a multiple of parallel.micro_batch={par.micro_batch}"
        )
    if cfg.task.seq_len > model.seq_len:
        raise ConfigError(f"task.seq_len={cfg.task.seq_len} exceeds the model's {model.seq_len} positions")
    if cfg.task.max_qa_len > cfg.task.seq_len - 4:
        raise ConfigError(f"task.max_qa_len={cfg.task.max_qa_len} leaves no room for the article in task.seq_len")
    cfg.hardware = hardware.resolve(cfg.hardware, par.tp, measure_peak=True)
    return directory, model


def run(cfg: RaceConfig) -> dict:
    directory, model = prepare(cfg)
    tokenizer = load_tokenizer(cfg, directory, model)
    questions = read_questions(cfg)
    train_questions = len(questions["train"])
    if train_questions < cfg.parallel.global_batch:
        raise ConfigError(
            f"{train_questions} train questions are fewer than parallel.global_batch={cfg.parallel.global_batch}"
        )
    steps = cfg.task.epochs * (train_questions // cfg.parallel.global_batch)
    cfg.optimizer.warmup_iters = round(cfg.task.warmup_fraction * steps)
    cfg.optimizer.decay_iters = steps
    inputs_dir = Path(cfg.run_dir) / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for split, split_questions in questions.items():
        log.info("RACE %s: tokenizing %d questions", split, len(split_questions))
        inputs[split] = str(inputs_dir / f"{split}.npz")
        np.savez(inputs[split], **encode_split(split_questions, tokenizer, cfg))
    (Path(cfg.run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    payload = {"config": asdict(cfg), "checkpoint": str(directory), "inputs": inputs}
    if launch.joins_existing_job():
        results = worker(payload)
    else:
        results = launch.spawn(worker, payload, cfg.parallel.tp, cfg.run_dir)
    if not results:  # a non-zero torchrun rank: rank 0 reports
        return {}
    results = {"task": "race", **results, "checkpoint": str(directory), "tp": cfg.parallel.tp}
    (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2))
    log.info("RACE results (%s):\n%s", Path(cfg.run_dir) / "results.json", json.dumps(results, indent=2))
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="race")
def main(raw: DictConfig) -> dict:
    cfg: RaceConfig = OmegaConf.to_object(raw)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        return run(cfg)
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(2)
    except launch.WorkerFailed as error:
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
