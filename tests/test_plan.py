"""The planner's numbers: parameter counts, state bytes by hand, and activations against measured ones."""

import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_exp import preflight
from megatron_exp.config import RECOMPUTE_MODES
from megatron_exp.hardware import autocast, parameter_dtype
from megatron_exp.models.contract import Batch
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import random, state
from megatron_exp.plan import (
    activation_bytes,
    estimate,
    layer_activation_bytes,
    measure_activation_bytes,
    measure_step_peak_bytes,
    report,
)
from megatron_exp.training.distributed_optimizer import DistributedOptimizer
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.mixed_precision import MainWeightsOptimizer
from megatron_exp.training.optim import build_optimizer, optimizer_step
from megatron_exp.training.schedule import MicroBatches, Pipeline
from tests.conftest import CONF_DIR, compose_config
from tests.distributed import run_on_ranks


def _resolved(overrides):
    cfg = compose_config(overrides)
    cfg = preflight.resolve(cfg, measure_peak=False)
    return cfg


def test_gpt_8b_at_tp8_counts_and_state_memory_by_hand():
    plan = estimate(_resolved(["model=gpt_8b", "parallel.tp=8", "data/tokenizer=gpt2", "hardware=v100"]))
    h, l = 3072, 72
    assert plan["parameters_total"] == 12 * l * h * h + 13 * l * h + (51200 + 1024) * h + 2 * h
    # per rank: split matrices / 8, plus the replicated layernorms, row-parallel biases and positions
    replicated = l * (4 * h + 2 * h) + 2 * h + 1024 * h
    assert plan["parameters_per_rank"] == (plan["parameters_total"] - replicated) // 8 + replicated
    assert plan["weights_gb"] + plan["gradients_gb"] + plan["optimizer_gb"] == pytest.approx(
        plan["parameters_per_rank"] * 18 / 1e9
    )  # fp16 parameters with fp32 main gradients, main weights and Adam's moments
    assert plan["fits"] is False  # 8-way TP alone does not fit a 32 GB V100 at micro batch 8 ...
    recompute = estimate(
        _resolved(
            [
                "model=gpt_8b",
                "parallel.tp=8",
                "data/tokenizer=gpt2",
                "hardware=v100",
                "parallel.recompute=full",
            ]
        )
    )
    assert recompute["fits"] is True  # ... with full recomputation, as in the paper, it does


def test_the_distributed_optimizer_keeps_1_over_dp_of_adams_state_per_rank():
    common = ["model=gpt_8b", "parallel.tp=8", "parallel.dp=4", "data/tokenizer=gpt2", "hardware=a100"]
    common.append("hardware.params=fp32")  # fp32 parameters under autocast: their own main weights
    plain = estimate(_resolved(common))
    cfg = _resolved([*common, "parallel.distributed_optimizer=true"])
    sharded = estimate(cfg)
    per_rank = sharded["parameters_per_rank"]
    assert sharded["optimizer_gb"] == pytest.approx(plain["optimizer_gb"] / 4) == pytest.approx(per_rank * 8 / 4 / 1e9)
    assert (sharded["weights_gb"], sharded["gradients_gb"]) == (plain["weights_gb"], plain["gradients_gb"])
    assert preflight.state_bytes_per_parameter(cfg) == 4 + 4 + 8 / 4
    # Adam's slices save 6 bytes per parameter; the flat gradient buffer, resident for the run, costs the 4 that
    # the plain optimizer frees after each step (its peak, at the forward's end, holds no gradients)
    assert plain["total_gb"] - sharded["total_gb"] == pytest.approx(per_rank * (6 - 4) / 1e9)
    assert "Adam state (2 x fp32 / dp=4)" in report(cfg, sharded)


GPT_175B = ["model=gpt_175b", "parallel.tp=8", "parallel.pp=8", "hardware=a100"]
MEMORY_OPTIONS = [
    "parallel.sequence_parallel=true", "parallel.recompute=selective", "parallel.distributed_optimizer=true"
]  # fmt: skip


@pytest.mark.parametrize("params", ["low", "fp32"])
@pytest.mark.parametrize("sp", [False, True])
def test_a_layer_keeps_korthikantis_activations_less_the_attention_scores(sp, params):
    """Korthikanti et al.'s per-layer counts (bf16, 1-byte dropout masks) less the 5 a s / h of scores that the fused
    attention never keeps: s b h (10 + 24/t) with TP alone and with selective recomputation, 34 s b h / t with
    sequence parallelism and selective recomputation (selective frees only the softmax's row statistics here), and
    2 s b h r with full recomputation: exactly, with bf16 parameters (hardware.params=low). fp32 parameters under
    autocast add per layer the bf16 copies of its weights (2 x 12 h^2 / t) and the fp32 residual stream: 2 more bytes
    on its two saved tensors (4 s b h r), and a 4-byte input with full recomputation."""
    cfg = _resolved([*GPT_175B, f"parallel.sequence_parallel={sp}", f"hardware.params={params}"])
    b, s, h, t = cfg.parallel.micro_batch, cfg.data.seq_len, cfg.model.hidden, 8
    r = 1 / t if sp else 1  # the sequence share of what lies outside the TP regions
    paper = 34 * s * b * h / t if sp else s * b * h * (10 + 24 / t)
    fp32_parameters = 2 * 12 * h * h / t + 4 * s * b * h * r if params == "fp32" else 0
    row_statistics = b * (cfg.model.heads / t) * s * 4
    assert layer_activation_bytes(cfg, "selective") == pytest.approx(paper + fp32_parameters)
    assert layer_activation_bytes(cfg, "none") == pytest.approx(paper + fp32_parameters + row_statistics)
    assert layer_activation_bytes(cfg, "full") == pytest.approx((4 if params == "fp32" else 2) * s * b * h * r)


def test_gpt_175b_at_tp8_pp8_fits_an_a100_with_sequence_parallelism_and_selective_recomputation_not_without():
    """`plan` as README shows it: one micro-batch of 8 a step, each stage holding one in flight."""
    assert estimate(_resolved([*GPT_175B, *MEMORY_OPTIONS]))["fits"] is True
    assert estimate(_resolved(GPT_175B))["fits"] is False


def test_low_precision_parameters_cost_18_bytes_and_6_plus_12_over_dp_with_the_distributed_optimizer():
    common = ["model=gpt_8b", "parallel.tp=8", "parallel.dp=4", "data/tokenizer=gpt2", "hardware=a100"]
    cfg = _resolved(common)  # on a GPU at bf16, hardware.params=auto is low
    plain = estimate(cfg)
    per_rank = plain["parameters_per_rank"]
    assert cfg.hardware.params == "low" and preflight.state_bytes_per_parameter(cfg) == 2 + 4 + 4 + 8
    assert (plain["weights_gb"], plain["gradients_gb"], plain["optimizer_gb"]) == pytest.approx(
        (per_rank * 2 / 1e9, per_rank * 4 / 1e9, per_rank * (4 + 8) / 1e9)
    )  # bf16 weights; fp32 main gradients; fp32 main weights and Adam's two moments
    text = report(cfg, plain)
    assert "weights (bf16)" in text and "main gradients (fp32)" in text
    assert "main weights + Adam state (3 x fp32)" in text
    sharded_cfg = _resolved([*common, "parallel.distributed_optimizer=true"])
    sharded = estimate(sharded_cfg)
    assert preflight.state_bytes_per_parameter(sharded_cfg) == 6 + 12 / 4
    assert sharded["optimizer_gb"] == pytest.approx(per_rank * 12 / 4 / 1e9)
    # the main gradients are resident in both: the distributed optimizer saves 9 of the main weights' and moments' 12
    assert plain["total_gb"] - sharded["total_gb"] == pytest.approx(per_rank * (12 - 3) / 1e9)
    assert "main weights + Adam state (3 x fp32 / dp=4)" in report(sharded_cfg, sharded)
    fp32 = estimate(_resolved([*common, "hardware.params=fp32"]))
    state_gb = [sum(plan[k] for k in ("weights_gb", "gradients_gb", "optimizer_gb")) for plan in (plain, fp32)]
    assert state_gb[0] - state_gb[1] == pytest.approx(per_rank * (18 - 16) / 1e9)  # 2 bytes more per parameter
    # ... but fp32 parameters keep more activations under autocast: an fp32 residual, the weights' bf16 copies
    assert fp32["activations_gb"] > plain["activations_gb"]


def test_pipeline_stages_count_their_layers_the_micro_batches_in_flight_and_their_ends():
    common = ["model.layers=8", "model.hidden_dropout=0", "model.attention_dropout=0", "parallel.micro_batch=2"]
    serial = _resolved([*common, "parallel.global_batch=16"])
    layer = layer_activation_bytes(serial)
    head = activation_bytes(serial, "none") - 8 * layer  # final layernorm and loss: one micro-batch
    one_f_one_b = _resolved([*common, "parallel.pp=4", "parallel.global_batch=16"])  # 8 micro-batches
    output = 2 * serial.data.seq_len * serial.model.hidden * 4  # a stage's output, kept for its backward
    # stage s holds 2 layers and its output for p - s micro-batches in flight; the last the head instead
    assert [activation_bytes(one_f_one_b, "none", stage=s) for s in range(4)] == pytest.approx(
        [4 * (2 * layer + output), 3 * (2 * layer + output), 2 * (2 * layer + output), 2 * layer + head]
    )
    gpipe = _resolved([*common, "parallel.pp=4", "parallel.global_batch=16", "parallel.schedule=gpipe"])
    assert activation_bytes(gpipe, "none", stage=0) == pytest.approx(8 * (2 * layer + output))  # all 8
    plan = estimate(one_f_one_b)
    assert plan["largest_stage"] == 0 and plan["pipeline_bubble"] == pytest.approx(3 / 8)
    per_stage, whole = preflight.parameter_counts(one_f_one_b)
    assert whole == preflight.parameter_counts(serial)[1] and per_stage < whole / 2  # the tied copy counted once


def _mini(dropout: float, *overrides: str):
    return _resolved(
        ["model=gpt_mini", "data.seq_len=128", "parallel.micro_batch=4", f"model.hidden_dropout={dropout}",
         f"model.attention_dropout={dropout}", "hardware=cpu", *overrides]
    )  # fmt: skip


def _activations_of(cfg) -> int:
    """What this rank's model (TP shard, sequence parallel as configured) keeps over one forward and backward."""
    random.seed(0, state.current().tp.rank)
    par = cfg.parallel
    model = GPTModel(cfg.model, recompute=par.recompute, sequence_parallel=par.sequence_parallel)
    tokens = torch.randint(0, cfg.model.vocab_size, (par.micro_batch, cfg.data.seq_len + 1))
    with autocast(cfg.hardware.precision, model.device)():
        return measure_activation_bytes(model, tokens)


@functools.cache
def _measured_activation_bytes(dropout: float, recompute: str, layers: int = 4) -> int:
    return _activations_of(_mini(dropout, f"parallel.recompute={recompute}", f"model.layers={layers}"))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_activation_estimate_is_within_25_percent_and_a_layer_within_5_of_the_measured(dropout, recompute):
    cfg = _mini(dropout)
    measured = _measured_activation_bytes(dropout, recompute)  # kept across the forward pass
    assert activation_bytes(cfg, recompute, peak=False) == pytest.approx(measured, rel=0.25)
    # one layer: what a model with one more layer keeps in addition
    one_more = _measured_activation_bytes(dropout, recompute, cfg.model.layers + 1) - measured
    assert layer_activation_bytes(cfg, recompute) == pytest.approx(one_more, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_under_bf16_autocast_a_layer_also_keeps_its_weights_bf16_copies_and_an_fp32_residual(recompute):
    """fp32 parameters under autocast (as on GPU): each matmul saves the bf16 copy of its weight for backward, and
    the residual stream (the layer input, the mid residual) stays fp32: CPU autocast casts as CUDA's does."""
    cfg = _mini(0.0, f"parallel.recompute={recompute}", "hardware.precision=bf16")
    kept = [_activations_of(_mini(0.0, f"parallel.recompute={recompute}", "hardware.precision=bf16",
                                  f"model.layers={layers}")) for layers in (4, 5)]  # fmt: skip
    assert layer_activation_bytes(cfg, recompute) == pytest.approx(kept[1] - kept[0], rel=0.05)
    assert activation_bytes(cfg, recompute, peak=False) == pytest.approx(kept[0], rel=0.05)


def _record_on_ranks(measure, configs, directory):
    Path(directory, f"{dist.get_rank()}.json").write_text(json.dumps([measure(cfg) for cfg in configs]))


def _measured_on_two_ranks(measure, configs, pp: int = 1) -> list[list[int]]:
    """`measure(cfg)` for every config on each rank of one 2-rank job ([rank][config]): one job serves every
    parametrization."""
    with tempfile.TemporaryDirectory() as directory:
        run_on_ranks(2, _record_on_ranks, measure, configs, directory, pp=pp)
        return [json.loads(Path(directory, f"{rank}.json").read_text()) for rank in range(2)]


TP2_CASES = [(sp, recompute) for sp in (False, True) for recompute in RECOMPUTE_MODES]


def _tp2(sp: bool, recompute: str, *overrides: str):
    return _mini(
        0.1, "parallel.tp=2", f"parallel.sequence_parallel={sp}", f"parallel.recompute={recompute}", *overrides
    )


@functools.cache
def _tp2_activations() -> dict:
    """Rank 0's measured activations at tp=2 for each case: (whole model, one layer: what one more keeps)."""
    configs = [_tp2(sp, mode, f"model.layers={layers}") for sp, mode in TP2_CASES for layers in (4, 5)]
    kept = _measured_on_two_ranks(_activations_of, configs)[0]
    return {case: (kept[2 * i], kept[2 * i + 1] - kept[2 * i]) for i, case in enumerate(TP2_CASES)}


@pytest.mark.slow
@pytest.mark.parametrize("sp, recompute", TP2_CASES)
def test_at_tp2_a_layers_activations_are_within_5_percent_of_the_measured(sp, recompute):
    """Sequence parallelism divides what TP leaves replicated (layer input, the layernorm outputs, the dropout
    masks; the final layernorm's input and output, the embedding's mask) by tp; dropout on, so masks count."""
    cfg = _tp2(sp, recompute)
    whole, layer = _tp2_activations()[sp, recompute]
    assert layer_activation_bytes(cfg, recompute) == pytest.approx(layer, rel=0.05)
    assert activation_bytes(cfg, recompute, peak=False) == pytest.approx(whole, rel=0.05)


def test_selective_keeps_less_than_none_and_full_less_than_selective():
    """On CPU with attention dropout, where the math path keeps the s x s scores that selective frees."""
    kept = [_measured_activation_bytes(0.1, mode) for mode in RECOMPUTE_MODES]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3


def test_the_entry_point_prints_the_plan(tmp_path):
    command = [sys.executable, "-m", "megatron_exp.plan", "model=gpt_8b", "parallel.tp=8", "hardware=h100"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(CONF_DIR.parent), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parameters per rank" in done.stdout and "fits" in done.stdout
    assert "8.317B" in done.stdout  # the preset alone selects GPT-2's BPE, padded to 51,200 at TP=8
    assert list(tmp_path.iterdir()) == []  # the planner writes nothing


def _measured_step_peak(cfg) -> int:
    """The peak of a real training step on this rank, built as the trainer builds it (its stage's part of the
    model, sequence parallelism, the plain or the distributed optimizer, fp32 main weights for bf16 parameters) and
    run as the loop runs it: the schedule's forward and backward passes (micro-batches in turn, or the pipeline's
    1F1B), the gradient sync, the clip and the fused AdamW step; measured after a first step has made Adam's
    state."""
    grid, par = state.current(), cfg.parallel
    random.seed(0, grid.tp.rank, stage=grid.pp.rank)
    layout = preflight.pipeline_layout(cfg)
    model = GPTModel(cfg.model, recompute=par.recompute, part=layout.part(grid.pp.rank),
                     sequence_parallel=par.sequence_parallel)  # fmt: skip
    parameters, low = list(model.parameters()), parameter_dtype(cfg.hardware)
    if par.distributed_optimizer or low:
        build = DistributedOptimizer if par.distributed_optimizer else MainWeightsOptimizer
        optimizer = build(model, cfg.optimizer, grid, low)
        sync = GradientSync(model, grid, flat=optimizer.grads if par.distributed_optimizer else None)
        adam, update = optimizer.optimizer, functools.partial(optimizer.step, cfg.optimizer.clip_grad)
    else:
        optimizer = adam = build_optimizer(model, cfg.optimizer)
        sync = GradientSync(model, grid)
        update = functools.partial(optimizer_step, optimizer, parameters, cfg.optimizer.clip_grad, grid)
    cast = autocast(cfg.hardware.precision, model.device)
    schedule = Pipeline(model, grid, layout, par.schedule, cast) if par.pp > 1 else MicroBatches(model, cast)
    shape = (preflight.micro_batches(cfg), par.micro_batch, cfg.data.seq_len + 1)
    tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    batches = [Batch({"tokens": t[:, :-1]}, {"targets": t[:, 1:]}) for t in tokens]

    def step():
        schedule.train(batches)
        sync()
        update()

    step()
    resident = [*parameters, *(t for s in adam.state.values() for t in s.values() if t.dim())]
    if par.distributed_optimizer or low:  # the flat gradient buffer; fp32 main weights (views of fp32 parameters)
        resident += [optimizer.grads, *optimizer.main]
    return measure_step_peak_bytes(step, resident)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_predicted_peak_is_within_10_percent_of_a_measured_training_step(dropout, recompute, accumulate):
    cfg = _mini(dropout, f"parallel.recompute={recompute}", f"parallel.global_batch={accumulate * 4}")
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(_measured_step_peak(cfg), rel=0.10)


def _check_peak(cfg):
    """On every rank: the estimate is within 10% of the measured peak of the step, that of the largest stage's
    ranks in a pipeline (stages differ: the first holds the most micro-batches in flight, the last the head)."""
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, _measured_step_peak(cfg))
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(max(every_rank), rel=0.10)


BF16_PARAMETERS = ["hardware.precision=bf16", "hardware.params=low"]  # fp32 main gradients and main weights


@pytest.mark.parametrize("params", ["fp32", pytest.param("low", marks=pytest.mark.slow)])
def test_the_predicted_peak_with_the_distributed_optimizer_is_within_10_percent_at_dp2(params):
    low = BF16_PARAMETERS if params == "low" else []  # then each rank keeps fp32 main weights of its slice
    cfg = _mini(0.0, "parallel.dp=2", "parallel.distributed_optimizer=true", "parallel.global_batch=8", *low)
    run_on_ranks(2, _check_peak, cfg, tp=1)


@functools.cache
def _tp2_step_peaks() -> dict:
    """The larger of the two TP ranks' measured step peaks for each tp=2 case (one job for all of them)."""
    measured = _measured_on_two_ranks(_measured_step_peak, [_tp2(sp, mode) for sp, mode in TP2_CASES])
    return {case: max(peaks) for case, *peaks in zip(TP2_CASES, *measured, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("sp, recompute", TP2_CASES)
def test_at_tp2_the_predicted_peak_is_within_10_percent_of_a_measured_training_step(sp, recompute):
    assert estimate(_tp2(sp, recompute))["total_gb"] * 1e9 == pytest.approx(_tp2_step_peaks()[sp, recompute], rel=0.10)


def _pp2(recompute: str):
    """4 micro-batches over 2 stages: 1F1B's steady state, where stage 0 holds 2 in flight beside the gradients
    accumulated from the first backward, and stage 1 the head."""
    return _mini(0.1, "parallel.pp=2", f"parallel.recompute={recompute}", "parallel.global_batch=16")


@functools.cache
def _pp2_step_peaks() -> dict:
    """Each stage's measured step peak ([stage 0, stage 1]) under 1F1B at pp=2, for each recompute mode."""
    measured = _measured_on_two_ranks(_measured_step_peak, [_pp2(mode) for mode in RECOMPUTE_MODES], pp=2)
    return {mode: peaks for mode, *peaks in zip(RECOMPUTE_MODES, *measured, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_at_pp2_the_predicted_peak_of_the_largest_stage_is_within_10_percent_of_a_measured_1f1b_step(recompute):
    cfg = _pp2(recompute)
    peaks, plan = _pp2_step_peaks()[recompute], estimate(cfg)
    assert plan["total_gb"] * 1e9 == pytest.approx(max(peaks), rel=0.10)
    assert plan["largest_stage"] == peaks.index(max(peaks))


@pytest.mark.parametrize(
    "recompute, accumulate", [("full", 1), pytest.param("none", 2, marks=pytest.mark.slow)]
)  # fmt: skip
def test_the_predicted_peak_with_bf16_parameters_and_fp32_main_weights_is_within_10_percent(recompute, accumulate):
    cfg = _mini(0.0, *BF16_PARAMETERS, f"parallel.recompute={recompute}", f"parallel.global_batch={accumulate * 4}")
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(_measured_step_peak(cfg), rel=0.10)
