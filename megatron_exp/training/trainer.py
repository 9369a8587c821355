"""The training loop of one worker: micro-batches with gradient accumulation, DP averaging, clipping, the
optimizer step, periodic validation, a final test evaluation, and metrics from global rank 0."""

from __future__ import annotations

import logging
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megatron_exp import launch
from megatron_exp.config import Config, HardwareConfig, typed
from megatron_exp.data import token_store
from megatron_exp.data.bert_dataset import BERTSamples, Vocabulary
from megatron_exp.data.gpt_dataset import GPTSamples, micro_batch_positions
from megatron_exp.hardware import AUTOCAST_DTYPES
from megatron_exp.models import build_model
from megatron_exp.parallel import random, state
from megatron_exp.parallel.mappings import all_reduce_
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training import checkpoint, flops
from megatron_exp.training.metrics import MetricSinks, wandb_settings
from megatron_exp.training.optim import DynamicLossScaler, build_optimizer, learning_rate, optimizer_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def device_of(hardware: HardwareConfig) -> torch.device:
    if hardware.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def load_samples(cfg: Config) -> dict[str, GPTSamples | BERTSamples]:
    """Train (shuffled), valid and test samples for the model's architecture, from the prepared token cache."""
    by_sentence = cfg.model.arch == "bert"
    cache = token_store.cache_path(cfg.data, by_sentence)
    seed, seq_len = cfg.train.seed, cfg.data.seq_len
    if not by_sentence:
        return {
            split: GPTSamples(token_store.load_tokens(cache, split), seq_len, seed, split == "train", split)
            for split in ("train", "valid", "test")
        }
    vocab = Vocabulary.of(token_store.load_tokenizer(cache))
    samples = {}
    for split in ("train", "valid", "test"):
        tokens, sentences = token_store.load_tokens(cache, split), token_store.load_sentences(cache, split)
        samples[split] = BERTSamples(tokens, *sentences, vocab, seq_len, seed, split == "train", split)
    return samples


class Trainer:
    def __init__(self, cfg: Config, grid: ProcessGrid, wandb_config: dict | None = None):
        self.cfg, self.grid = cfg, grid
        par = cfg.parallel
        self.device = device_of(cfg.hardware)
        self.seq_len = cfg.data.seq_len
        self.accumulation = par.global_batch // (par.micro_batch * grid.dp.size)
        random.seed(cfg.train.seed, grid.tp.rank, self.device)

        with torch.device(self.device):
            recompute, seed = par.activation_checkpointing, cfg.train.seed
            self.model = build_model(cfg.model, activation_checkpointing=recompute, seed=seed)
        if cfg.train.compile:
            self.model.compile_layers()
        self.forward_model = self.model
        if grid.dp.size > 1:  # bucketed gradient all-reduce over the DP group, overlapped with backward
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids, process_group=grid.dp.handle)
        self.parameters = list(self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scaler = DynamicLossScaler(self.device) if cfg.hardware.precision == "fp16" else None
        dtype = AUTOCAST_DTYPES.get(cfg.hardware.precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else nullcontext

        self.splits = load_samples(cfg)

        m = cfg.model
        vocab = self.model.embedding.padded_vocab_size
        self.model_flops = flops.model_flops(par.global_batch, self.seq_len, m.layers, m.hidden, vocab)
        self.hardware_flops = flops.hardware_flops(
            par.global_batch, self.seq_len, m.layers, m.hidden, vocab, par.activation_checkpointing
        )
        self.start_iteration = 0
        if cfg.resume:
            self._restore(Path(cfg.resume))
        elif cfg.checkpoint.init_from:
            directory = Path(cfg.checkpoint.init_from)
            weights = checkpoint.load_model_state(directory, grid.tp.size, grid.tp.rank)
            checkpoint.load_into(self.model, weights, directory, "model")
            log.info("initialized the weights from %s", directory)
        self.sinks = None
        if grid.rank == 0:
            self.sinks = MetricSinks(Path(cfg.run_dir), cfg.train.iterations, wandb_config)
            self._log_setup()

    def _state(self, iteration: int) -> dict:
        return {
            "iteration": iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": random.get_rng_state(self.device),
        }

    def save_checkpoint(self, iteration: int) -> None:
        grid = self.grid
        meta = {"world_size": grid.world_size, "tp": grid.tp.size, "dp": grid.dp.size, "model": asdict(self.cfg.model)}
        state = self._state(iteration)
        checkpoint.save(self.cfg.run_dir, iteration, state, grid.rank, meta, self.cfg.checkpoint.keep)

    def _restore(self, directory: Path) -> None:
        """Continue exactly where the checkpoint left off: weights, optimizer, loss scale, RNG, data position."""
        state = checkpoint.load_rank(directory, self.grid.rank)
        path = checkpoint.rank_file(directory, self.grid.rank)
        checkpoint.load_into(self.model, state["model"], path, "model")
        checkpoint.load_into(self.optimizer, state["optimizer"], path, "optimizer state")
        if self.scaler and state["loss_scaler"]:
            self.scaler.load_state_dict(state["loss_scaler"])
        random.set_rng_state(state["rng"], self.device)
        self.start_iteration = state["iteration"]  # the data position follows from it
        log.info("resumed from %s at iteration %d", directory, self.start_iteration)

    def _log_setup(self) -> None:
        cfg, grid = self.cfg, self.grid
        shard = sum(p.numel() for p in self.parameters)
        log.info(
            "model: %s, %.2fM parameters on rank 0 (TP shard) | grid: tp=%d dp=%d | %s, %s | global batch %d = "
            "micro %d x dp %d x accumulation %d, seq %d",
            cfg.model.name, shard / 1e6, grid.tp.size, grid.dp.size, self.device, cfg.hardware.precision,
            cfg.parallel.global_batch, cfg.parallel.micro_batch, grid.dp.size, self.accumulation, self.seq_len,
        )  # fmt: skip
        peak = cfg.hardware.peak_tflops
        log.info(
            "FLOPs: %.3g per iteration (model), %.3g executed; %s; peak %s TFLOP/s per device (%s)",
            self.model_flops, self.hardware_flops, flops.ATTENTION_CONVENTION,
            "unknown" if peak is None else f"{peak:.4g}", cfg.hardware.name,
        )  # fmt: skip

    def _micro_batch(self, split: str, iteration: int, micro: int) -> tuple[dict, dict]:
        """(model inputs, loss targets) of one micro-batch, on the device."""
        par, dp = self.cfg.parallel, self.grid.dp
        positions = micro_batch_positions(iteration, micro, par.global_batch, par.micro_batch, dp.size, dp.rank)
        inputs, targets = self.splits[split].micro_batch(positions)
        move = {k: t.to(self.device, non_blocking=True) for k, t in (inputs | targets).items()}
        return {k: move[k] for k in inputs}, {k: move[k] for k in targets}

    def _dp_mean(self, values: list[float | torch.Tensor]) -> list[float]:
        """Average per-rank values over the DP group (one collective, one host sync)."""
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in values])
        if self.grid.dp.size > 1:
            all_reduce_(stacked, self.grid.dp)
            stacked /= self.grid.dp.size
        return stacked.tolist()

    def train_step(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step (iteration counts from 1), with no host sync; returns the mean loss, the grad norm and
        1.0 if fp16 overflow skipped the step (its norm then 0.0), else 0.0, all on the device."""
        lr = learning_rate(self.cfg.optimizer, iteration, self.cfg.train.iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accumulation):
            inputs, targets = self._micro_batch("train", iteration - 1, micro)
            last = micro == self.accumulation - 1
            sync = nullcontext() if last or self.forward_model is self.model else self.forward_model.no_sync()
            with sync:
                with self.autocast():
                    outputs = self.forward_model(**inputs)
                loss = self.model.loss(outputs, **targets) / self.accumulation
                (loss * self.scaler.scale if self.scaler else loss).backward()
            loss_sum += loss.detach()
        norm, skipped = optimizer_step(
            self.optimizer, self.parameters, self.cfg.optimizer.clip_grad, self.grid, self.scaler
        )
        return loss_sum, norm, skipped

    @torch.no_grad()
    def evaluate(self, split: str, batches: int) -> dict[str, float]:
        """Mean loss terms (GPT: loss; BERT: loss, mlm_loss, sop_loss, sop_accuracy) over `batches` global
        batches of `split`, read in order from its start."""
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        for i in range(batches):
            for micro in range(self.accumulation):
                inputs, targets = self._micro_batch(split, i, micro)
                with self.autocast():
                    outputs = self.model(**inputs)
                for name, value in self.model.loss_terms(outputs, **targets).items():
                    totals[name] = totals.get(name, 0.0) + value.detach()
        self.model.train()
        means = self._dp_mean([total / (batches * self.accumulation) for total in totals.values()])
        return dict(zip(totals, means, strict=True))

    def _eval_record(self, iteration: int, final: bool) -> dict:
        record = {"iteration": iteration}
        splits = {"valid": self.cfg.train.eval_iters}
        if final:  # the whole test split, once
            splits["test"] = max(1, len(self.splits["test"]) // self.cfg.parallel.global_batch)
        for split, batches in splits.items():
            terms = self.evaluate(split, batches)
            lm_loss = terms.get("mlm_loss", terms["loss"])  # BERT: the perplexity of the masked tokens
            record |= {f"{split}/{name}": value for name, value in terms.items()}
            record[f"{split}/ppl"] = math.exp(min(lm_loss, 700.0))
        return record

    def _train_record(self, iteration: int, steps: int, loss: float, norm: float, skipped: float, seconds: float):
        cfg = self.cfg
        step_time = seconds / steps
        world = self.grid.world_size
        record = {
            "iteration": iteration,
            "train/loss": loss,
            "train/lr": learning_rate(cfg.optimizer, iteration, cfg.train.iterations),
            "train/grad_norm": norm,
            "train/skipped_steps": round(skipped),
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": cfg.parallel.global_batch * self.seq_len / step_time,
            "perf/tflops_per_device": self.model_flops / step_time / world / 1e12,
            "perf/peak_memory_gb": peak_memory_gb(self.device),
        }
        if cfg.model.arch == "gpt":  # BERT's training loss adds the SOP loss: its perplexity means nothing
            record["train/ppl"] = math.exp(min(loss, 700.0))
        if self.scaler:
            record["train/loss_scale"] = self.scaler.scale.item()
        if cfg.hardware.peak_tflops:
            peak = cfg.hardware.peak_tflops
            record["perf/mfu"] = flops.utilization(self.model_flops, step_time, world, peak)
            record["perf/hfu"] = flops.utilization(self.hardware_flops, step_time, world, peak)
        return record

    def run(self) -> dict:
        cfg = self.cfg
        loss_window = torch.zeros((), device=self.device)
        norm_window = torch.zeros((), device=self.device)  # over the steps taken (a skipped step adds 0)
        skipped_window = torch.zeros((), device=self.device)
        steps = 0
        window_start = time.perf_counter()
        record = {}
        for iteration in range(self.start_iteration + 1, cfg.train.iterations + 1):
            loss, norm, skipped = self.train_step(iteration)
            steps += 1
            loss_window += loss
            norm_window += norm
            skipped_window += skipped
            last = iteration == cfg.train.iterations
            if iteration % cfg.train.log_interval == 0 or last:
                mean_loss, sum_norm, skipped_steps = self._dp_mean([loss_window / steps, norm_window, skipped_window])
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        f"loss became {mean_loss} within iterations {iteration - steps + 1}-{iteration}: lower "
                        f"optimizer.lr (now {cfg.optimizer.lr}) or raise optimizer.warmup_iters; with fp16, try bf16"
                    )
                seconds = time.perf_counter() - window_start
                mean_norm = sum_norm / max(1, steps - skipped_steps)
                record = self._train_record(iteration, steps, mean_loss, mean_norm, skipped_steps, seconds)
                if self.sinks:
                    self.sinks.log(record)
                for window in (loss_window, norm_window, skipped_window):
                    window.zero_()
                steps = 0
                window_start = time.perf_counter()
            if last or (cfg.train.eval_interval and iteration % cfg.train.eval_interval == 0):
                eval_start = time.perf_counter()
                eval_record = self._eval_record(iteration, final=last)
                record |= eval_record
                if self.sinks:
                    self.sinks.log(eval_record)
                window_start += time.perf_counter() - eval_start  # evaluation time is not training time
            periodic = cfg.checkpoint.interval and iteration % cfg.checkpoint.interval == 0
            if periodic or (last and cfg.checkpoint.save_final):
                save_start = time.perf_counter()
                self.save_checkpoint(iteration)
                window_start += time.perf_counter() - save_start
        if self.sinks:
            self.sinks.close()
        return record


def worker(container: dict) -> dict:
    """One training rank (spawned, or a torchrun process): grid, trainer, teardown. Returns rank 0's results."""
    cfg = typed(Config, container)
    grid = launch.start_worker(cfg.hardware, cfg.parallel)
    try:
        result = Trainer(cfg, grid, wandb_settings(cfg) if grid.rank == 0 else None).run()
        launch.finish_worker()
        return result
    finally:
        state.destroy()
