"""What the evaluation entry points share: find the checkpoint and its tokenizer, read the task's text, start
workers that load the model at the requested TP x PP layout, score tokens on them, and report (results.json, a
table, a W&B eval run)."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tokenizers import Tokenizer

from megatron_exp import entry, hardware
from megatron_exp.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    ParallelConfig,
    RunSpec,
    TextTaskConfig,
    check_ranges,
)
from megatron_exp.data import files
from megatron_exp.data import tokenizer as tokenizers
from megatron_exp.hardware import device_of
from megatron_exp.models.contract import Batch
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.training import checkpoint
from megatron_exp.training.metrics import publish, wandb_settings
from megatron_exp.training.schedule import Pipeline

log = logging.getLogger("megatron_exp.tasks")


def load_tokenizer(cfg: EvalConfig | GenerateConfig, directory: Path, model: ModelConfig) -> Tokenizer:
    """The tokenizer the model was trained with (for an evaluation or generation): given, kept in the run (or
    conversion) directory, or GPT-2's."""
    if cfg.tokenizer:
        return Tokenizer.from_file(str(Path(cfg.tokenizer).expanduser()))
    kept = tokenizers.kept_with(directory.parents[1], model.vocab_size)
    if kept is not None:
        return kept
    raise ConfigError(
        f"checkpoint={cfg.checkpoint}: no tokenizer.json in {directory.parents[1]} and the vocabulary "
        f"({model.vocab_size}) is not GPT-2's: set tokenizer=<path to the tokenizer.json it was trained with>"
    )


def read_texts(task: TextTaskConfig) -> list[str]:
    """The task's texts: lines of `text_field` from a hub split or a local jsonl, or a local text file whole."""
    if task.source.startswith("hub:"):
        from datasets import load_dataset  # here: importing datasets adds ~0.5 s to every process's start

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
        return files.read_jsonl(path, "task.source", task.text_field)
    return [files.read_text(path, "task.source")]  # whole, newlines untranslated, as the reference reads it


def gpt_checkpoint(cfg: EvalConfig | GenerateConfig, refusal: str) -> tuple[Path, ModelConfig]:
    """The checkpoint directory `cfg.checkpoint` names and its model, which must be a GPT that runs at
    `parallel.tp` x `parallel.pp` (and `virtual_stages`); `refusal` ends the error for another architecture."""
    if cfg.parallel.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel=true saves activation memory in training only; evaluation and generation "
            "run without it (decoding with a KV cache cannot split the sequence): leave it false"
        )
    directory = checkpoint.require(cfg.checkpoint, "checkpoint")
    model = checkpoint.model_config_of(directory)
    if model.arch != "gpt":
        raise ConfigError(f"checkpoint={cfg.checkpoint} holds a {model.arch} model: {refusal}")
    model.validate(cfg.parallel.tp)
    problem = PipelineLayout(cfg.parallel.pp, cfg.parallel.virtual_stages, model.layers).split_problem()
    if problem:
        raise ConfigError(problem)
    return directory, model


def prepare(composed: EvalConfig, run_dir: str, joined: bool, build_inputs: Callable) -> RunSpec[EvalConfig]:
    """Resolve the checkpoint, the model it holds and its tokenizer, check the TP degree, and read the task's
    inputs with `build_inputs(cfg, tokenizer)`: the evaluation's spec."""
    cfg = copy.deepcopy(composed)
    check_ranges(cfg)
    directory, model = gpt_checkpoint(
        cfg,
        "zero-shot language modelling needs a GPT (BERT checkpoints are fine-tuned with python -m "
        "megatron_exp.tasks.race)",
    )
    cfg.parallel.dp = 1
    if cfg.task.seq_len is None:
        cfg.task.seq_len = model.seq_len
    if cfg.task.seq_len > model.seq_len:
        raise ConfigError(f"task.seq_len={cfg.task.seq_len} exceeds the model's {model.seq_len} positions")
    workers = cfg.parallel.tp * cfg.parallel.pp
    cfg.hardware = hardware.resolve(cfg.hardware, workers, measure_peak=False)
    inputs = build_inputs(cfg, load_tokenizer(cfg, directory, model))
    training_run = directory.parents[1].name
    name, group = f"{cfg.task.name}-{training_run}", training_run
    # the eval run is published after the workers finish: there are no system metrics to sample
    wandb = wandb_settings(cfg.logger, run_dir, asdict(cfg), name=name, group=group, gpu=False)
    return RunSpec(cfg, run_dir, workers, joined, wandb, {"checkpoint": str(directory), **inputs})


class TokenScores:
    """-log p(target) and the greedy prediction at every position of a batch, the same on every rank. The logits
    exist only as vocabulary slices across TP, on the last pipeline stage: there they are reduced to these two
    [batch, seq] tensors (vocab-parallel, never gathered) and broadcast over the pipeline group."""

    def __init__(self, model: GPTModel, autocast: Callable = contextlib.nullcontext, pipeline: Pipeline | None = None):
        self.model, self.autocast, self.pipeline = model, autocast, pipeline

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pipeline is None:
            with torch.no_grad(), self.autocast():
                logits = self.model(tokens)
            return self.model.token_losses(logits, targets).float(), self.model.predictions(logits)
        logits = self.pipeline.outputs(Batch({"tokens": tokens}, {}))
        if logits is None:  # not the last stage: receive what it computes
            losses = torch.empty(targets.shape, dtype=torch.float32, device=self.device)
            predictions = torch.empty(targets.shape, dtype=torch.long, device=self.device)
        else:
            losses, predictions = self.model.token_losses(logits, targets).float(), self.model.predictions(logits)
        pp = self.pipeline.grid.pp
        for tensor in (losses, predictions):
            dist.broadcast(tensor, group=pp.handle, group_src=pp.size - 1)
        return losses, predictions


def token_scores(
    directory: Path, grid: state.ProcessGrid, device: torch.device, parallel: ParallelConfig, autocast: Callable
) -> TokenScores:
    """The checkpoint's model at this rank's place in the TP x PP grid (any layout it was saved at), as scores."""
    model, pipeline = load_stage(directory, grid, device, parallel, autocast)
    return TokenScores(model, autocast, pipeline)


def load_stage(
    directory: Path, grid: state.ProcessGrid, device: torch.device, parallel: ParallelConfig, autocast: Callable
) -> tuple[GPTModel, Pipeline | None]:
    """The checkpoint's model at this rank's place in the TP x PP grid (any layout it was saved at), and at
    pp > 1 the pipeline that runs its stage's forward passes."""
    model = load_model(directory, grid, device, parallel.virtual_stages)
    if grid.pp.size == 1:
        return model, None
    layout = PipelineLayout(grid.pp.size, parallel.virtual_stages, model.cfg.layers)
    return model, Pipeline(model, grid, layout, parallel.schedule, autocast)


def evaluate_rank(evaluate: Callable, spec: RunSpec[EvalConfig], grid: state.ProcessGrid) -> dict:
    """One evaluation rank: `evaluate(scores, task, inputs, progress)` with this rank's part of the model."""
    cfg, device = spec.config, device_of(spec.config.hardware)
    autocast = hardware.autocast(cfg.hardware.precision, device)
    scores = token_scores(Path(spec.inputs["checkpoint"]), grid, device, cfg.parallel, autocast)
    return evaluate(scores, cfg.task, spec.inputs, progress=grid.rank == 0)


def report(spec: RunSpec[EvalConfig], results: dict) -> dict:
    """results.json, a printed table and a W&B eval run grouped with the training run."""
    cfg = spec.config
    par = cfg.parallel
    results = {"task": cfg.task.name, **results, "checkpoint": spec.inputs["checkpoint"], "tp": par.tp, "pp": par.pp}
    width = max(map(len, results))
    table = "\n".join(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
                      for key, value in results.items())  # fmt: skip
    log.info("%s results (%s):\n%s", cfg.task.name, Path(spec.run_dir) / "results.json", table)
    publish(spec.wandb, results)
    return results


def main(raw: DictConfig, schema: type[EvalConfig], build_inputs: Callable, evaluate: Callable) -> dict | None:
    """The body of an evaluation entry point (its config typed by `schema`): its inputs from
    `build_inputs(cfg, tokenizer)`, scored on every rank by `evaluate(scores, task, inputs, progress)`."""
    prepare_task = functools.partial(prepare, build_inputs=build_inputs)
    return entry.run(raw, schema, prepare_task, functools.partial(evaluate_rank, evaluate), report)


def load_model(directory: Path, grid: state.ProcessGrid, device: torch.device, virtual_stages: int = 1) -> GPTModel:
    """The checkpoint's model as this rank's TP shard of its pipeline stage, in eval mode (dropout off)."""
    cfg = checkpoint.model_config_of(directory)
    part = PipelineLayout(grid.pp.size, virtual_stages, cfg.layers).part(grid.pp.rank)
    with torch.device(device):
        model = GPTModel(cfg, grid.tp, part=part)
    weights = checkpoint.load_model_state(directory, model, grid)
    checkpoint.load_into(model, weights, directory, "model")
    return model.eval()
