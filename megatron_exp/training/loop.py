"""The training core: what every training-like entry point (pretraining, RACE fine-tuning) shares.

A `Work` supplies the model, its micro-batches for each iteration, its evaluation and what one iteration costs;
the loop does the rest: the learning-rate schedule, the step as a schedule over micro-batches, clipping, fp16 loss
scaling and the optimizer step (on fp32 main weights where the parameters are bf16/fp16), the metrics record
(loss, ppl, tokens/s, TFLOP/s, MFU/HFU, memory) every `log_interval` iterations, evaluation and checkpoints at
their cadence, and exact resume. Metrics go out from global rank 0; the device is read only when a record is
written.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from megatron_exp.config import HardwareConfig, OptimizerConfig
from megatron_exp.hardware import autocast, parameter_dtype, peak_memory_gb
from megatron_exp.models.contract import Batch, Model
from megatron_exp.parallel import random
from megatron_exp.parallel.mappings import all_reduce_
from megatron_exp.parallel.pipeline import PipelineLayout, bubble_fraction
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training import checkpoint, flops, reshard
from megatron_exp.training.distributed_optimizer import DistributedOptimizer, is_shard, merged_state
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.metrics import MetricSinks
from megatron_exp.training.mixed_precision import MainWeightsOptimizer
from megatron_exp.training.optim import DynamicLossScaler, build_optimizer, learning_rate, optimizer_step
from megatron_exp.training.schedule import MicroBatches, Pipeline
from megatron_exp.training.stop import Interrupted, StopAgreement

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Cadence:
    """When the loop logs, evaluates and saves (iterations count optimizer steps from 1)."""

    iterations: int
    log_interval: int
    eval_interval: int = 0  # 0: only after the last iteration
    checkpoint_interval: int = 0  # 0: no periodic saves
    keep: int = 0  # complete checkpoints kept, newest first; 0: all
    save_final: bool = True
    save_on_signal: bool = False  # a checkpoint when SIGINT/SIGTERM stops the run (SLURM preemption)


@dataclass(frozen=True)
class Cost:
    """What one iteration of the whole job processes and computes."""

    tokens: int
    model_flops: float
    executed_flops: float  # with recomputation counted (HFU)


class Work(Protocol):
    """What a training-like entry point gives the loop."""

    model: Model
    cost: Cost

    def micro_batches(self, iteration: int) -> list[Batch]:
        """This rank's micro-batches of `iteration`, in order."""

    def evaluate(self, iteration: int, final: bool, schedule: MicroBatches) -> dict[str, float]:
        """An evaluation record's values (keys prefixed by split, e.g. valid/loss)."""

    def checkpoint_meta(self, iteration: int) -> dict:
        """What meta.json records besides the layout and the model."""


def reported(terms: list[torch.Tensor], grid: ProcessGrid, shared: tuple[torch.Tensor, ...] = ()) -> list[float]:
    """Loss terms as reported (in fp32, one host sync): from the last pipeline stage (the others hold zeros: they
    are summed over the PP group), averaged over DP; `shared` values (the same on every stage) only averaged."""
    stacked = torch.stack([v.float() for v in terms])
    all_reduce_(stacked, grid.pp)
    stacked = torch.cat([stacked, torch.stack([v.float() for v in shared])]) if shared else stacked
    all_reduce_(stacked, grid.dp)
    return (stacked / grid.dp.size).tolist()


class TrainingLoop:
    def __init__(
        self,
        work: Work,
        grid: ProcessGrid,
        *,
        optimizer: OptimizerConfig,
        hardware: HardwareConfig,
        cadence: Cadence,
        run_dir: str,
        wandb: dict | None = None,
        resume: str | None = None,
        pipeline: PipelineLayout | None = None,
        schedule: str = "1f1b",
        seed: int = 0,
        distributed_optimizer: bool = False,
    ):
        """`wandb`: wandb.init arguments (used on global rank 0); `resume`: a checkpoint directory to continue (at
        any layout); `pipeline`: the layout of a pipeline of more than one stage, run with `schedule`; `seed`: the
        run's seed, from which a layout change re-derives the dropout streams; `distributed_optimizer`: Adam's
        state sharded over DP (training/distributed_optimizer.py). With `hardware.params=low` the parameters are
        cast to the compute precision and the optimizer steps fp32 main weights (training/mixed_precision.py),
        which checkpoints save as the model's weights."""
        self.work, self.grid, self.model = work, grid, work.model
        self.optimizer_cfg, self.hardware, self.cadence, self.run_dir = optimizer, hardware, cadence, run_dir
        self.device = self.model.device
        self.parameters = list(self.model.parameters())
        self.distributed_optimizer = distributed_optimizer
        low = parameter_dtype(hardware)  # None: fp32 parameters, their own main weights
        self.main_weights = low is not None
        if distributed_optimizer:
            self.optimizer = DistributedOptimizer(self.model, optimizer, grid, low)
        elif low:
            self.optimizer = MainWeightsOptimizer(self.model, optimizer, grid, low)
        else:
            self.optimizer = build_optimizer(self.model, optimizer)
        flat = self.optimizer.grads if distributed_optimizer else None  # the reduce-scatter's buffer
        self.sync_gradients = GradientSync(self.model, grid, flat=flat)
        self.scaler = DynamicLossScaler(self.device) if hardware.precision == "fp16" else None
        scale, cast = (self.scaler.scale if self.scaler else None), autocast(hardware.precision, self.device)
        if pipeline is not None and pipeline.stages > 1:
            self.schedule = Pipeline(self.model, grid, pipeline, schedule, cast, scale)
        else:
            self.schedule = MicroBatches(self.model, cast, scale)
        self.layout = pipeline or PipelineLayout(layers=self.model.cfg.layers)
        self.start_iteration, self.seed = 0, seed
        if resume:
            self._restore(Path(resume))
        self.stop = StopAgreement(grid.control)
        self.sinks = None
        if grid.rank == 0:
            self.sinks = MetricSinks(Path(run_dir), cadence.iterations, wandb, after=self.start_iteration)
        if self.sinks:
            self._log_setup()

    def _log_setup(self) -> None:
        cfg, grid, cost = self.model.cfg, self.grid, self.work.cost
        shard = sum(p.numel() for p in self.parameters)
        log.info(
            "model: %s, %.2fM parameters on rank 0 (its TP shard of stage 0) | grid: tp=%d pp=%d dp=%d | %s, %s, %s",
            cfg.name, shard / 1e6, grid.tp.size, grid.pp.size, grid.dp.size, self.device, self.hardware.precision,
            f"{self.parameters[0].dtype} parameters" + (", fp32 main weights" if self.main_weights else ""),
        )  # fmt: skip
        peak = self.hardware.peak_tflops
        log.info(
            "FLOPs: %.3g per iteration (model), %.3g executed; %s; peak %s TFLOP/s per device (%s)",
            cost.model_flops, cost.executed_flops, flops.ATTENTION_CONVENTION,
            "unknown" if peak is None else f"{peak:.4g}", self.hardware.name,
        )  # fmt: skip

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self, iteration: int) -> None:
        grid = self.grid
        meta = {
            "world_size": grid.world_size, "tp": grid.tp.size, "dp": grid.dp.size, "pp": grid.pp.size,
            "virtual_stages": self.layout.virtual, "model": asdict(self.model.cfg),
        }  # fmt: skip
        state = {
            "iteration": iteration,
            "model": self.optimizer.main_state_dict() if self.main_weights else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": random.get_rng_state(self.device),
        }
        meta |= self.work.checkpoint_meta(iteration)
        checkpoint.save(self.run_dir, iteration, state, grid.rank, meta, self.cadence.keep)

    def _restore(self, directory: Path) -> None:
        """Continue exactly where the checkpoint left off: weights, optimizer, loss scale, RNG, data position (it
        follows from the iteration and the global batch). Saved at another TP or PP layout: `_restore_resharded`.

        Saved at another DP degree (the same TP and PP layout), this rank reads DP replica 0 of its (stage, TP
        rank) position: DP replicas hold the same weights, loss scale and RNG streams. Adam's state is converted
        where it was saved with or without the distributed optimizer, or sliced at another DP degree."""
        meta, grid = checkpoint.read_meta(directory), self.grid
        if checkpoint.layout_of(meta) != (grid.tp.size, grid.pp.size, self.layout.virtual):
            self._restore_resharded(directory, meta)
            return
        same_dp = meta["dp"] == grid.dp.size
        rank = grid.rank if same_dp else checkpoint.stage_ranks(meta, grid.pp.rank)[grid.tp.rank]
        state = checkpoint.load_rank(directory, rank)
        path = checkpoint.rank_file(directory, rank)
        checkpoint.load_into(self.model, state["model"], path, "model")
        if self.main_weights:
            self.optimizer.load_main_weights(state["model"])
        optimizer_state = state["optimizer"]
        if is_shard(optimizer_state) and not (self.distributed_optimizer and same_dp):
            optimizer_state = merged_state(directory, grid.pp.rank, grid.tp.rank)
        checkpoint.load_into(self.optimizer, optimizer_state, path, "optimizer state")
        if self.scaler and state["loss_scaler"]:
            self.scaler.load_state_dict(state["loss_scaler"])
        self.start_iteration = state["iteration"]
        rng = state["rng"]
        if rng is None or rng["tp_region"] is None:  # converted from another layout: its streams as far as they carry
            reshard.reseed(self.seed, self.start_iteration, self.grid, self.device)
        if rng is not None:
            random.set_rng_state(rng, self.device)
        log.info("resumed from %s at iteration %d", directory, self.start_iteration)

    def _restore_resharded(self, directory: Path, meta: dict) -> None:
        """The checkpoint's weights and Adam moments merged to serial and cut for this rank's place in the new
        grid; the loss scale and iteration as saved; the dropout streams continued where they mean the same at
        the new layout, else re-derived (training/reshard.py)."""
        grid, saved = self.grid, checkpoint.SavedShards(directory)
        weights = saved.weights_for(self.model, grid.tp)
        checkpoint.load_into(self.model, weights, directory, "model")
        if self.main_weights:
            self.optimizer.load_main_weights(weights)
        groups = self.optimizer.state_dict()["param_groups"]
        moments = reshard.shard_optimizer_state(reshard.SavedAdam(saved), self.model, grid.tp, groups)
        checkpoint.load_into(self.optimizer, moments, directory, "optimizer state")
        alike = saved.any_rank_state()
        if self.scaler and alike["loss_scaler"]:
            self.scaler.load_state_dict(alike["loss_scaler"])
        self.start_iteration = alike["iteration"]
        reshard.reseed(self.seed, self.start_iteration, grid, self.device)
        replicated = reshard.replicated_stream(saved, grid.pp.size, self.layout.virtual, grid.pp.rank)
        if replicated is not None:
            random.set_rng_state(replicated, self.device)
        log.info(
            "resumed from %s at iteration %d, resharded from tp=%d pp=%d (virtual %d) dp=%d to tp=%d pp=%d "
            "(virtual %d) dp=%d; dropout streams %s",
            directory, self.start_iteration, *checkpoint.layout_of(meta), meta["dp"],
            grid.tp.size, grid.pp.size, self.layout.virtual, grid.dp.size,
            "re-derived" if replicated is None else "continued (replicated) and re-derived (TP regions)",
        )  # fmt: skip

    # --- one step ----------------------------------------------------------------------------------------------

    def step(self, iteration: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One optimizer step, with no host sync: the mean loss terms, the gradient norm (0.0 for a step that fp16
        overflow skipped) and 1.0 if it was skipped, else 0.0, all on the device."""
        lr = learning_rate(self.optimizer_cfg, iteration, self.cadence.iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.work.micro_batches(iteration)
        self.bubble = bubble_fraction(self.layout.stages, self.layout.virtual, len(batches))
        terms = self.schedule.train(batches)
        self.sync_gradients()
        clip = self.optimizer_cfg.clip_grad
        if isinstance(self.optimizer, torch.optim.Optimizer):
            norm, skipped = optimizer_step(self.optimizer, self.parameters, clip, self.grid, self.scaler)
        else:  # it steps its main weights (or slice) itself
            norm, skipped = self.optimizer.step(clip, self.scaler)
        return terms, norm, skipped

    def _train_record(self, iteration: int, steps: int, means: dict, norm: float, skipped: float, seconds: float):
        cost, world, peak = self.work.cost, self.grid.world_size, self.hardware.peak_tflops
        step_time = seconds / steps
        record = {"iteration": iteration, "tokens_seen": iteration * cost.tokens}
        record |= {f"train/{name}": value for name, value in means.items()}
        if self.model.perplexity_term:
            record["train/ppl"] = math.exp(min(means[self.model.perplexity_term], 700.0))
        record |= {
            "train/lr": learning_rate(self.optimizer_cfg, iteration, self.cadence.iterations),
            "train/grad_norm": norm,
            "train/skipped_steps": round(skipped),
        }
        if self.scaler:
            record["train/loss_scale"] = self.scaler.scale.item()
        record["perf/tokens_per_s"] = cost.tokens / step_time
        record["perf/tflops_per_device"] = cost.model_flops / step_time / world / 1e12
        if peak:
            record["perf/mfu"] = flops.utilization(cost.model_flops, step_time, world, peak)
            record["perf/hfu"] = flops.utilization(cost.executed_flops, step_time, world, peak)
            if record["perf/hfu"] > 1 and self.sinks and not self.sinks.warned_utilization:
                self.sinks.warned_utilization = True
                log.warning(
                    "MFU %.1f%% / HFU %.1f%% exceed 100%%: the peak is a measurement problem, not a result (%s); "
                    "set hardware.peak_tflops, or delete the peak cache to measure it again",
                    100 * record["perf/mfu"], 100 * record["perf/hfu"], self.hardware.name,
                )  # fmt: skip
        if self.grid.pp.size > 1:
            record["perf/pipeline_bubble"] = self.bubble  # analytic: (p - 1) / (v m)
        record["perf/step_time_s"] = step_time
        record["perf/peak_memory_gb"] = peak_memory_gb(self.device)
        return record

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self, after: Callable[[], None] | None = None) -> dict:
        """Train from the start (or the resumed) iteration to the last; returns the last train and eval record.
        A signal stops it at a step boundary (see training/stop.py): Interrupted is raised after the record, and
        with `save_on_signal` a checkpoint, of that iteration. `after` runs on every rank after the last
        iteration, before rank 0 closes the metric sinks (which may wait for W&B while its peers wait for it in
        a collective of `after`)."""
        c = self.cadence
        self.window: dict[str, torch.Tensor] = {}  # sums since the last record; a skipped step adds a norm of 0
        self.steps, self.window_start, record = 0, time.perf_counter(), {}
        for iteration in range(self.start_iteration + 1, c.iterations + 1):
            terms, norm, skipped = self.step(iteration)
            for name, value in (*terms.items(), ("grad_norm", norm), ("skipped", skipped)):
                self.window[name] = self.window[name] + value if name in self.window else value
            self.steps += 1
            last = iteration == c.iterations
            evaluate = last or (c.eval_interval and iteration % c.eval_interval == 0)
            if iteration % c.log_interval == 0 or last or evaluate:
                record = self._log_window(iteration)
            if evaluate:
                eval_start = time.perf_counter()
                eval_record = {"iteration": iteration, "tokens_seen": iteration * self.work.cost.tokens}
                eval_record |= self.work.evaluate(iteration, last, self.schedule)
                record |= eval_record
                if self.sinks:
                    self.sinks.log(eval_record)
                self.window_start += time.perf_counter() - eval_start  # evaluation time is not training time
            saved = (c.checkpoint_interval and iteration % c.checkpoint_interval == 0) or (last and c.save_final)
            if saved:
                save_start = time.perf_counter()
                self.save_checkpoint(iteration)
                self.window_start += time.perf_counter() - save_start
            signum = self.stop.boundary()
            if signum and not last:
                self._interrupt(iteration, signum, saved)
        self.stop.finish()
        if after is not None:
            after()
        if self.sinks:
            self.sinks.close(summary=record)
        return record

    def _log_window(self, iteration: int) -> dict:
        """The record of the steps since the last one (every rank takes part: the means are over DP)."""
        names = [name for name in self.window if name not in ("grad_norm", "skipped")]
        shared = (self.window["grad_norm"], self.window["skipped"])
        *values, sum_norm, skipped_steps = reported([self.window[n] / self.steps for n in names], self.grid, shared)
        means = dict(zip(names, values, strict=True))
        if not math.isfinite(means["loss"]):
            raise TrainingDiverged(
                f"loss became {means['loss']} within iterations {iteration - self.steps + 1}-{iteration}: lower "
                f"optimizer.lr (now {self.optimizer_cfg.lr}) or raise optimizer.warmup_iters; with fp16, try bf16"
            )
        seconds = time.perf_counter() - self.window_start
        mean_norm = sum_norm / max(1, self.steps - skipped_steps)
        record = self._train_record(iteration, self.steps, means, mean_norm, skipped_steps, seconds)
        if self.sinks:
            self.sinks.log(record)
        self.window, self.steps, self.window_start = {}, 0, time.perf_counter()
        return record

    def _interrupt(self, iteration: int, signum: int, saved: bool) -> None:
        if self.steps:
            self._log_window(iteration)
        if self.cadence.save_on_signal and not saved:
            self.save_checkpoint(iteration)
        self.stop.finish()
        latest = checkpoint.find_latest(self.run_dir)
        latest = str(latest) if latest else None
        if self.sinks:
            self.sinks.interrupted(iteration, signum, latest)
            self.sinks.close()
        raise Interrupted(signum, iteration, latest)
