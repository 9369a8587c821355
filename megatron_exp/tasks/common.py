"""What the evaluation entry points share: find the checkpoint and its tokenizer, read the task's text, start TP
workers that load the model at the requested degree, and report (results.json, a table, a W&B eval run)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import load_dataset
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from tokenizers import Tokenizer

from megatron_exp import hardware, launch
from megatron_exp.config import ConfigError, EvalConfig, ModelConfig, TaskConfig, TokenizerConfig, typed
from megatron_exp.data import tokenizer as tokenizers
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.training import checkpoint
from megatron_exp.training.metrics import publish, wandb_settings
from megatron_exp.training.trainer import device_of

log = logging.getLogger("megatron_exp.tasks")

ConfigStore.instance().store(name="eval_schema", node=EvalConfig)

GPT2_VOCAB = 50257


def load_tokenizer(cfg: EvalConfig, directory: Path, model: ModelConfig) -> Tokenizer:
    """The tokenizer the model was trained with: given, kept in the run directory, or GPT-2's."""
    if cfg.tokenizer:
        return Tokenizer.from_file(str(Path(cfg.tokenizer).expanduser()))
    beside = directory.parents[1] / "tokenizer.json"
    if beside.is_file():
        return Tokenizer.from_file(str(beside))
    if model.vocab_size == GPT2_VOCAB:
        return tokenizers.gpt2(TokenizerConfig(kind="gpt2", vocab_size=GPT2_VOCAB))
    raise ConfigError(
        f"checkpoint={cfg.checkpoint}: no tokenizer.json in {directory.parents[1]} and the vocabulary "
        f"({model.vocab_size}) is not GPT-2's: set tokenizer=<path to the tokenizer.json it was trained with>"
    )


def read_texts(task: TaskConfig) -> list[str]:
    """The task's texts: lines of `text_field` from a hub split or a local jsonl, or a local text file whole."""
    if task.source.startswith("hub:"):
        name = task.source.removeprefix("hub:")
        try:
            rows = load_dataset(name, task.hub_config, split=task.split)
        except Exception as error:
            raise ConfigError(
                f"task.source={task.source} could not be loaded from the hub ({type(error).__name__}); check the "
                "name and the network, or point task.source at a local file"
            ) from error
        return list(rows[task.text_field])
    path = Path(task.source).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.source={task.source} is not a file: give a local file or hub:<dataset name>")
    if path.suffix in (".jsonl", ".json"):
        return [json.loads(line)[task.text_field] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [path.read_text(encoding="utf-8")]


def prepare(cfg: EvalConfig) -> tuple[Path, ModelConfig, Tokenizer]:
    """Resolve the checkpoint, the model it holds (dropout off) and its tokenizer; check the TP degree."""
    directory = checkpoint.require(cfg.checkpoint, "checkpoint")
    model = checkpoint.model_config_of(directory)
    if model.arch != "gpt":
        raise ConfigError(
            f"checkpoint={cfg.checkpoint} holds a {model.arch} model: zero-shot language modelling needs a GPT "
            "(BERT checkpoints are fine-tuned with python -m megatron_exp.tasks.race)"
        )
    model.validate(cfg.parallel.tp)
    cfg.parallel.dp = 1
    if cfg.task.seq_len is None:
        cfg.task.seq_len = model.seq_len
    if cfg.task.seq_len > model.seq_len:
        raise ConfigError(f"task.seq_len={cfg.task.seq_len} exceeds the model's {model.seq_len} positions")
    cfg.hardware = hardware.resolve(cfg.hardware, cfg.parallel.tp, measure_peak=False)
    return directory, model, load_tokenizer(cfg, directory, model)


def run(cfg: EvalConfig, directory: Path, inputs: dict, worker: Callable[[dict], dict]) -> dict:
    """Start the TP workers on `inputs`, then report rank 0's results."""
    payload = {"config": asdict(cfg), "checkpoint": str(directory), "inputs": inputs}
    if launch.joins_existing_job():
        results = worker(payload)
    else:
        results = launch.spawn(worker, payload, cfg.parallel.tp, cfg.run_dir)
    if results is None:  # a non-zero torchrun rank: rank 0 reports
        return {}
    results = {"task": cfg.task.name, **results, "checkpoint": str(directory), "tp": cfg.parallel.tp}
    (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    table = "\n".join(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
                      for key, value in results.items())  # fmt: skip
    log.info("%s results (%s):\n%s", cfg.task.name, Path(cfg.run_dir) / "results.json", table)
    training_run = directory.parents[1].name
    publish(wandb_settings(cfg, name=f"{cfg.task.name}-{training_run}", group=training_run), results)
    return results


def main(cfg: EvalConfig, build_inputs: Callable, worker: Callable[[dict], dict]) -> dict:
    """The body of an evaluation entry point: prepare, tokenize with `build_inputs(cfg, tokenizer)`, run."""
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    try:
        directory, _, tokenizer = prepare(cfg)
        inputs = build_inputs(cfg, tokenizer)
    except ConfigError as error:
        log.error("error: %s", error)
        sys.exit(2)
    try:
        return run(cfg, directory, inputs, worker)
    except launch.WorkerFailed as error:
        log.error("error: %s", error)
        sys.exit(1)


def run_worker(payload: dict, evaluate: Callable) -> dict | None:
    """One evaluation rank: the model at this TP degree, then `evaluate(model, cfg, inputs, autocast, progress)`."""
    cfg = typed(EvalConfig, payload["config"])
    grid = launch.start_worker(cfg.hardware, cfg.parallel)
    try:
        directory = Path(payload["checkpoint"])
        model = load_model(directory, grid.tp, device_of(cfg.hardware))
        dtype = hardware.AUTOCAST_DTYPES.get(cfg.hardware.precision)
        autocast = (lambda: torch.autocast(model.embedding.weight.device.type, dtype=dtype)) if dtype else nullcontext
        results = evaluate(model, cfg.task, payload["inputs"], autocast, progress=grid.rank == 0)
        launch.finish_worker()
        return results if grid.rank == 0 else None
    finally:
        state.destroy()


def load_model(directory: Path, tp: state.Group, device: torch.device) -> GPTModel:
    """The checkpoint's model as this TP rank's shard, in eval mode (dropout off)."""
    cfg = checkpoint.model_config_of(directory)
    with torch.device(device):
        model = GPTModel(cfg, tp)
    weights = checkpoint.load_model_state(directory, tp.size, tp.rank)
    checkpoint.load_into(model, weights, directory, "model")
    return model.eval()
