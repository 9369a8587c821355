"""The planner's numbers: parameter counts, state bytes by hand, and activations against measured ones."""

import functools
import subprocess
import sys

import pytest
import torch

from megatron_exp import preflight
from megatron_exp.config import RECOMPUTE_MODES
from megatron_exp.hardware import autocast, parameter_dtype
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
    # 2 bytes more per parameter; the main gradients, resident, add the 4 the plain optimizer frees after a step
    assert plain["total_gb"] - fp32["total_gb"] == pytest.approx(per_rank * (18 - 12) / 1e9, rel=1e-3)


def test_pipeline_stages_count_their_layers_the_micro_batches_in_flight_and_their_ends():
    common = ["model.layers=8", "model.hidden_dropout=0", "model.attention_dropout=0", "parallel.micro_batch=2"]
    serial = _resolved([*common, "parallel.global_batch=16"])
    layer = layer_activation_bytes(serial)
    head = activation_bytes(serial, "none") - 8 * layer  # final layernorm and loss: one micro-batch
    one_f_one_b = _resolved([*common, "parallel.pp=4", "parallel.global_batch=16"])  # 8 micro-batches
    # stage s holds 2 layers for p - s micro-batches in flight; the last also the head
    assert [activation_bytes(one_f_one_b, "none", stage=s) for s in range(4)] == pytest.approx(
        [8 * layer, 6 * layer, 4 * layer, 2 * layer + head]
    )
    gpipe = _resolved([*common, "parallel.pp=4", "parallel.global_batch=16", "parallel.schedule=gpipe"])
    assert activation_bytes(gpipe, "none", stage=0) == pytest.approx(8 * 2 * layer)  # all 8 micro-batches
    plan = estimate(one_f_one_b)
    assert plan["largest_stage"] == 0 and plan["pipeline_bubble"] == pytest.approx(3 / 8)
    per_stage, whole = preflight.parameter_counts(one_f_one_b)
    assert whole == preflight.parameter_counts(serial)[1] and per_stage < whole / 2  # the tied copy counted once


def _mini(dropout: float, layers: int | None = None):
    overrides = [f"model.layers={layers}"] if layers else []
    return _resolved(
        ["model=gpt_mini", "data.seq_len=128", "parallel.micro_batch=4", f"model.hidden_dropout={dropout}",
         f"model.attention_dropout={dropout}", "hardware=cpu", *overrides]
    )  # fmt: skip


@functools.cache
def _measured_activation_bytes(dropout: float, recompute: str, layers: int | None = None) -> int:
    cfg = _mini(dropout, layers)
    random.seed(0, 0)
    model = GPTModel(cfg.model, recompute=recompute)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len + 1))
    return measure_activation_bytes(model, tokens)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_activation_estimate_is_within_25_percent_and_a_layer_within_5_of_the_measured(dropout, recompute):
    cfg = _mini(dropout)
    measured = _measured_activation_bytes(dropout, recompute)  # kept across the forward pass
    assert activation_bytes(cfg, recompute, peak=False) == pytest.approx(measured, rel=0.25)
    # one layer: what a model with one more layer keeps in addition
    one_more = _measured_activation_bytes(dropout, recompute, cfg.model.layers + 1) - measured
    assert layer_activation_bytes(cfg, recompute) == pytest.approx(one_more, rel=0.05)


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
    """The peak of a real training step (the loop's: each micro-batch's forward and backward, the gradient clip
    and the fused AdamW step), after a first step has made Adam's state."""
    random.seed(0, 0)
    model = GPTModel(cfg.model, recompute=cfg.parallel.recompute)
    optimizer = build_optimizer(model, cfg.optimizer)
    shape = (preflight.micro_batches(cfg), cfg.parallel.micro_batch, cfg.data.seq_len + 1)
    batches = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))

    def step():
        for tokens in batches:
            model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer_step(optimizer, list(model.parameters()), cfg.optimizer.clip_grad, state.SERIAL)

    step()
    resident = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values() if t.dim())]
    return measure_step_peak_bytes(step, resident)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_predicted_peak_is_within_10_percent_of_a_measured_training_step(dropout, recompute, accumulate):
    cfg = _mini(dropout)
    cfg.parallel.recompute, cfg.parallel.global_batch = recompute, accumulate * cfg.parallel.micro_batch
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(_measured_step_peak(cfg), rel=0.10)


def _check_distributed_optimizer_peak(cfg):
    grid = state.current()
    random.seed(0, 0)
    model = GPTModel(cfg.model)
    optimizer = DistributedOptimizer(model, cfg.optimizer, grid, parameter_dtype(cfg.hardware))
    sync = GradientSync(model, grid, optimizer.grads)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch, cfg.data.seq_len + 1))
    cast = autocast(cfg.hardware.precision, model.device)

    def step():
        with cast():
            loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        sync()
        optimizer.step(cfg.optimizer.clip_grad)

    step()
    moments = [t for s in optimizer.optimizer.state.values() for t in s.values() if t.dim()]
    resident = [*model.parameters(), optimizer.grads, *optimizer.main, *moments]  # main: views of params in fp32
    measured = measure_step_peak_bytes(step, resident)
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("params", ["fp32", pytest.param("low", marks=pytest.mark.slow)])
def test_the_predicted_peak_with_the_distributed_optimizer_is_within_10_percent_at_dp2(params):
    cfg = _mini(0.0)
    cfg.parallel.dp, cfg.parallel.distributed_optimizer, cfg.parallel.global_batch = 2, True, 8
    if params == "low":  # bf16 parameters, fp32 main gradients and fp32 main weights of each rank's slice
        cfg.hardware.precision, cfg.hardware.params = "bf16", "low"
    run_on_ranks(2, _check_distributed_optimizer_peak, cfg, tp=1)


def _measured_main_weights_peak(cfg) -> int:
    """`_measured_step_peak` with bf16 parameters (autocast bf16) and the plain optimizer on fp32 main weights."""
    random.seed(0, 0)
    model = GPTModel(cfg.model, recompute=cfg.parallel.recompute)
    optimizer = MainWeightsOptimizer(model, cfg.optimizer, state.SERIAL, torch.bfloat16)
    shape = (preflight.micro_batches(cfg), cfg.parallel.micro_batch, cfg.data.seq_len + 1)
    batches = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(0))

    def step():
        for tokens in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
            loss.backward()
        optimizer.step(cfg.optimizer.clip_grad)

    step()
    moments = [t for s in optimizer.optimizer.state.values() for t in s.values() if t.dim()]
    return measure_step_peak_bytes(step, [*model.parameters(), optimizer.grads, *optimizer.main, *moments])


@pytest.mark.parametrize(
    "recompute, accumulate", [("full", 1), pytest.param("none", 2, marks=pytest.mark.slow)]
)  # fmt: skip
def test_the_predicted_peak_with_bf16_parameters_and_fp32_main_weights_is_within_10_percent(recompute, accumulate):
    cfg = _mini(0.0)
    cfg.hardware.precision, cfg.hardware.params = "bf16", "low"
    cfg.parallel.recompute, cfg.parallel.global_batch = recompute, accumulate * cfg.parallel.micro_batch
    assert estimate(cfg)["total_gb"] * 1e9 == pytest.approx(_measured_main_weights_peak(cfg), rel=0.10)
