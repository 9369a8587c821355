"""Everything checked before a worker starts: fill in derived values, then fail fast with one clear line.

Each ConfigError names the key at fault and a fix. The memory check counts one rank's parameters on the meta
device (nothing is allocated) at `state_bytes_per_parameter`: 16 bytes each with fp32 parameters (weights,
gradients, Adam's two moments), 18 with bf16/fp16 ones (fp32 main gradients and main weights besides); the
distributed optimizer shards the moments and main weights over DP.
"""

from __future__ import annotations

import copy
import logging
import os

import torch

from megatron_exp import hardware
from megatron_exp.config import Config, ConfigError, ParallelConfig, check_ranges
from megatron_exp.models import build_model
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import ShardSpec

log = logging.getLogger(__name__)


def state_bytes_per_parameter(cfg: Config) -> float:
    """Weights, gradients and optimizer state per parameter of a rank. fp32 parameters (their own main weights):
    4 (weight) + 4 (gradient) + 8 (Adam's two fp32 moments) = 16. Low-precision ones (hardware.params=low):
    2 (bf16/fp16 weight) + 4 (fp32 main gradient) + 4 (fp32 main weight) + 8 = 18. The distributed optimizer
    divides what it keeps per slice, the moments and any main weights, by dp: 8 + 8/dp, or 6 + 12/dp."""
    shards = cfg.parallel.dp if cfg.parallel.distributed_optimizer else 1
    if cfg.hardware.params == "low":
        return 2 + 4 + (4 + 8) / shards
    return 4 + 4 + 8 / shards


def resolve(composed: Config, world_size: int | None = None, measure_peak: bool = True) -> Config:
    """A copy of `composed` with the derived values filled in: DP degree, global batch, sequence length, schedule
    length, hardware.

    `world_size` is given when joining an existing job (torchrun); otherwise this process launches tp x dp x pp.
    """
    check_ranges(composed)  # before any arithmetic on the values
    composed.optimizer.validate()  # a warmup longer than a derived decay (a short run of the paper's recipe) is fine
    cfg = copy.deepcopy(composed)
    par = cfg.parallel
    if par.dp is None:
        par.dp = world_size // (par.tp * par.pp) if world_size else 1
    if par.global_batch is None:
        par.global_batch = par.micro_batch * par.dp
    if cfg.data.seq_len is None:
        cfg.data.seq_len = cfg.model.seq_len
    if cfg.optimizer.decay_iters is None:
        cfg.optimizer.decay_iters = cfg.train.iterations
    if cfg.checkpoint.on_signal is None:
        cfg.checkpoint.on_signal = "SLURM_JOB_ID" in os.environ
    # Spawned workers share the CPU that this process measures alone; torchrun ranks each measure their own share.
    sharing = 1 if world_size else par.tp * par.dp * par.pp
    cfg.hardware = hardware.resolve(cfg.hardware, sharing, measure_peak)
    return cfg


def pipeline_layout(cfg: Config) -> PipelineLayout:
    return PipelineLayout(cfg.parallel.pp, cfg.parallel.virtual_stages, cfg.model.layers)


def micro_batches(cfg: Config) -> int:
    """Micro-batches per step on each DP replica (what a pipeline schedule runs over)."""
    par = cfg.parallel
    return par.global_batch // (par.micro_batch * par.dp)


def parameter_counts(cfg: Config) -> tuple[int, int]:
    """(parameters on the largest rank: the TP shard of the largest pipeline stage, parameters of the whole
    model), counted on the meta device."""
    stages, total = stage_parameter_counts(cfg)
    return max(stages), total


def stage_parameter_counts(cfg: Config) -> tuple[list[int], int]:
    """(parameters on a rank of each pipeline stage: its TP shard, parameters of the whole model), counted on the
    meta device."""
    par = cfg.parallel
    layout = pipeline_layout(cfg)
    stages, total = [], 0
    for stage in range(par.pp):
        with torch.device("meta"), state.use(state.virtual(par.tp, pp=par.pp, pp_rank=stage)):
            shard = build_model(cfg.model, part=layout.part(stage))
        stages.append(sum(p.numel() for p in shard.parameters()))
        counted = [p for p in shard.parameters() if not getattr(p, "pipeline_copy", False)]
        total += sum(p.numel() * (par.tp if ShardSpec.of(p).dim is not None else 1) for p in counted)
    return stages, total


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every check that needs no data: ranges, divisibility, batch arithmetic, devices, memory."""
    par, hw = cfg.parallel, cfg.hardware
    check_ranges(cfg)  # the derived values too
    cfg.model.validate(par.tp)
    if cfg.model.arch == "bert" and cfg.data.tokenizer.kind != "wordpiece":
        raise ConfigError(
            f"model.arch=bert reads WordPiece tokens but data.tokenizer.kind={cfg.data.tokenizer.kind}: set "
            "data/tokenizer=wordpiece_8k (trained on the corpus) or bert_uncased"
        )

    per_replica = par.micro_batch * par.dp
    if par.global_batch % per_replica:
        lower = max(per_replica, par.global_batch // per_replica * per_replica)
        raise ConfigError(
            f"parallel.global_batch={par.global_batch} is not a multiple of parallel.micro_batch x dp = "
            f"{par.micro_batch} x {par.dp}: use {lower} or {lower + per_replica}"
        )
    check_pipeline(cfg)
    if cfg.data.seq_len > cfg.model.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.seq_len={cfg.model.seq_len} (learned positions): "
            f"lower data.seq_len or raise model.seq_len"
        )
    problem = sequence_parallel_problem(par, cfg.data.seq_len, "data.seq_len")
    if problem:
        raise ConfigError(problem)
    if hw.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"hardware.precision={hw.precision} is unknown: fp32, bf16 or fp16")
    if hw.params == "low" and hw.precision == "fp32":
        raise ConfigError(
            "hardware.params=low keeps the parameters in the compute precision, but hardware.precision=fp32: set "
            "hardware.precision=bf16 (or fp16), or hardware.params=fp32"
        )

    workers = par.tp * par.dp * par.pp
    if world_size is not None and world_size != workers:
        raise ConfigError(
            f"parallel.tp x dp x pp = {par.tp} x {par.dp} x {par.pp} = {workers} but the job has {world_size} "
            f"processes: set parallel.dp={world_size // (par.tp * par.pp)} or start {workers} processes"
        )
    _check_devices(cfg, workers, joined=world_size is not None)
    _check_memory(cfg, workers)
    if hw.device == "cpu":
        _warn_about_cpu_speed(cfg, workers)


def sequence_parallel_problem(par: ParallelConfig, seq_len: int, key: str) -> str | None:
    """Why sequences of `seq_len` tokens (set by `key`) cannot be split over the TP ranks, or None."""
    if not par.sequence_parallel or seq_len % par.tp == 0:
        return None
    lower = max(par.tp, seq_len // par.tp * par.tp)
    return (
        f"{key}={seq_len} is not divisible by parallel.tp={par.tp}, which parallel.sequence_parallel=true splits "
        f"each sequence over: set {key}={lower} or {lower + par.tp}, or parallel.sequence_parallel=false"
    )


def check_pipeline(cfg: Config) -> None:
    par = cfg.parallel
    if par.pp == 1 and (par.virtual_stages > 1 or par.schedule == "interleaved"):
        key = f"parallel.virtual_stages={par.virtual_stages}" if par.virtual_stages > 1 else "parallel.schedule"
        raise ConfigError(f"{key} interleaves pipeline stages, but parallel.pp=1: set parallel.pp > 1")
    problem = pipeline_layout(cfg).validate(micro_batches(cfg), par.schedule)
    if problem:
        raise ConfigError(problem)


def _check_devices(cfg: Config, workers: int, joined: bool) -> None:
    hw = cfg.hardware
    if hw.device == "cuda":
        visible = torch.cuda.device_count()
        if visible == 0:
            raise ConfigError(
                f"hardware={hw.name} needs CUDA GPUs but torch sees none: use hardware=cpu (or auto) on this machine"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", workers)) if joined else workers
        if local > visible:
            raise ConfigError(
                f"parallel.tp x parallel.dp = {workers} workers need {local} GPUs on this node but {visible} are "
                "visible: lower parallel.tp/parallel.dp, or start the job with torchrun across nodes "
                "(python -m megatron_exp.plan shows what fits)"
            )
    elif hw.device != "cpu":
        raise ConfigError(f"hardware.device={hw.device} is unknown: cpu or cuda")


def _warn_about_cpu_speed(cfg: Config, workers: int) -> None:
    cores = os.cpu_count() or 1
    if workers > cores:
        log.warning("%d CPU workers share %d cores: each is slower, results are the same", workers, cores)
    if cfg.hardware.precision != "fp32":
        log.warning("hardware.precision=%s on CPU is far slower than fp32 here", cfg.hardware.precision)


def _check_memory(cfg: Config, workers: int) -> None:
    hw = cfg.hardware
    if hw.memory_gb is None:
        return
    per_rank, total = parameter_counts(cfg)
    per_parameter = state_bytes_per_parameter(cfg)
    need_rank = per_rank * per_parameter / 1e9
    need_total = total * per_parameter / 1e9
    # GPUs each hold one rank; CPU workers share the machine's memory.
    need, have = (need_rank, hw.memory_gb) if hw.device == "cuda" else (need_rank * workers, hw.memory_gb)
    if need > have:
        where = (
            f"each {hw.name} GPU has {have:.0f} GB" if hw.device == "cuda" else f"this CPU machine has {have:.0f} GB"
        )
        raise ConfigError(
            f"model={cfg.model.name} with parallel.tp={cfg.parallel.tp} needs ~{need_total:.0f} GB for weights, "
            f"gradients and Adam state ({total / 1e9:.2f}B parameters x {per_parameter:g} bytes; "
            f"~{need_rank:.1f} GB on each of {cfg.parallel.tp} TP ranks) but {where}: run it on "
            f"{cfg.parallel.tp} GPUs with more than {need_rank:.0f} GB each (e.g. hardware=h100), raise "
            "parallel.tp, or choose a smaller model (python -m megatron_exp.plan with the same overrides shows the "
            "breakdown)"
        )
