"""What the evaluation entry points share: find the checkpoint and its tokenizer, read the task's text, start TP
workers that load the model at the requested degree, and report (results.json, a table, a W&B eval run)."""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from datasets import load_dataset
from omegaconf import DictConfig
from tokenizers import Tokenizer

from megatron_exp import entry, hardware
from megatron_exp.config import ConfigError, EvalConfig, ModelConfig, RunSpec, TaskConfig, check_ranges
from megatron_exp.data import tokenizer as tokenizers
from megatron_exp.hardware import device_of
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.training import checkpoint
from megatron_exp.training.metrics import publish, wandb_settings

log = logging.getLogger("megatron_exp.tasks")


def load_tokenizer(cfg: EvalConfig, directory: Path, model: ModelConfig) -> Tokenizer:
    """The tokenizer the model was trained with: given, kept in the run (or conversion) directory, or GPT-2's."""
    if cfg.tokenizer:
        return Tokenizer.from_file(str(Path(cfg.tokenizer).expanduser()))
    kept = tokenizers.kept_with(directory.parents[1], model.vocab_size)
    if kept is not None:
        return kept
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
    return [path.read_bytes().decode("utf-8")]  # whole, newlines untranslated, as the reference reads it


def prepare(composed: EvalConfig, run_dir: str, joined: bool, build_inputs: Callable) -> RunSpec[EvalConfig]:
    """Resolve the checkpoint, the model it holds and its tokenizer, check the TP degree, and read the task's
    inputs with `build_inputs(cfg, tokenizer)`: the evaluation's spec."""
    cfg = copy.deepcopy(composed)
    check_ranges(cfg)
    directory = checkpoint.require(cfg.checkpoint, "checkpoint")
    model = checkpoint.model_config_of(directory)
    if model.arch != "gpt":
        raise ConfigError(
            f"checkpoint={cfg.checkpoint} holds a {model.arch} model: zero-shot language modelling needs a GPT "
            "(BERT checkpoints are fine-tuned with python -m megatron_exp.tasks.race)"
        )
    model.validate(cfg.parallel.tp)
    if cfg.parallel.pp != 1:
        raise ConfigError(
            f"parallel.pp={cfg.parallel.pp}: evaluations run on TP ranks only (a checkpoint of any pipeline layout "
            "loads); use parallel.pp=1"
        )
    cfg.parallel.dp = 1
    if cfg.task.seq_len is None:
        cfg.task.seq_len = model.seq_len
    if cfg.task.seq_len > model.seq_len:
        raise ConfigError(f"task.seq_len={cfg.task.seq_len} exceeds the model's {model.seq_len} positions")
    cfg.hardware = hardware.resolve(cfg.hardware, cfg.parallel.tp, measure_peak=False)
    inputs = build_inputs(cfg, load_tokenizer(cfg, directory, model))
    training_run = directory.parents[1].name
    name, group = f"{cfg.task.name}-{training_run}", training_run
    # the eval run is published after the workers finish: there are no system metrics to sample
    wandb = wandb_settings(cfg.logger, run_dir, asdict(cfg), name=name, group=group, gpu=False)
    return RunSpec(cfg, run_dir, cfg.parallel.tp, joined, wandb, {"checkpoint": str(directory), **inputs})


def evaluate_rank(evaluate: Callable, spec: RunSpec[EvalConfig], grid: state.ProcessGrid) -> dict:
    """One evaluation rank: the model at this TP degree, then `evaluate(model, task, inputs, autocast, progress)`."""
    cfg = spec.config
    model = load_model(Path(spec.inputs["checkpoint"]), grid, device_of(cfg.hardware))
    autocast = hardware.autocast(cfg.hardware.precision, model.device)
    return evaluate(model, cfg.task, spec.inputs, autocast, progress=grid.rank == 0)


def report(spec: RunSpec[EvalConfig], results: dict) -> dict:
    """results.json, a printed table and a W&B eval run grouped with the training run."""
    cfg = spec.config
    results = {"task": cfg.task.name, **results, "checkpoint": spec.inputs["checkpoint"], "tp": cfg.parallel.tp}
    width = max(map(len, results))
    table = "\n".join(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
                      for key, value in results.items())  # fmt: skip
    log.info("%s results (%s):\n%s", cfg.task.name, Path(spec.run_dir) / "results.json", table)
    publish(spec.wandb, results)
    return results


def main(raw: DictConfig, build_inputs: Callable, evaluate: Callable) -> dict | None:
    """The body of an evaluation entry point: its inputs from `build_inputs(cfg, tokenizer)`, scored on every TP
    rank by `evaluate(model, task, inputs, autocast, progress)`."""
    prepare_task = functools.partial(prepare, build_inputs=build_inputs)
    return entry.run(raw, EvalConfig, prepare_task, functools.partial(evaluate_rank, evaluate), report)


def load_model(directory: Path, grid: state.ProcessGrid, device: torch.device) -> GPTModel:
    """The checkpoint's model as this TP rank's shard, in eval mode (dropout off)."""
    cfg = checkpoint.model_config_of(directory)
    with torch.device(device):
        model = GPTModel(cfg, grid.tp)
    weights = checkpoint.load_model_state(directory, model, grid)
    checkpoint.load_into(model, weights, directory, "model")
    return model.eval()
