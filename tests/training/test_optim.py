import math

import pytest
import torch

from megatron_exp.config import ModelConfig, OptimizerConfig
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.training.optim import (
    DynamicLossScaler,
    build_optimizer,
    clip_gradients_,
    grad_norm,
    learning_rate,
)
from tests.distributed import run_on_ranks

CFG = ModelConfig(hidden=32, heads=4, layers=2, vocab_size=300, seq_len=16, hidden_dropout=0.0, attention_dropout=0.0)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_minimum():
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, decay_iters=110)
    assert learning_rate(opt, 1, 200) == pytest.approx(1e-4)
    assert learning_rate(opt, 10, 200) == pytest.approx(1e-3)
    assert learning_rate(opt, 60, 200) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway: cos = 0
    assert learning_rate(opt, 110, 200) == pytest.approx(1e-4)
    assert learning_rate(opt, 150, 200) == pytest.approx(1e-4)  # flat after decay_iters
    linear = OptimizerConfig(lr=1e-3, min_lr=0.0, warmup_iters=0, decay_iters=100, decay_style="linear")
    assert learning_rate(linear, 25, 100) == pytest.approx(0.75e-3)


def test_biases_and_layernorms_are_not_decayed():
    model = GPTModel(CFG)
    decay, no_decay = build_optimizer(model, OptimizerConfig()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert "layers.0.mlp.fc1.weight" in {names[id(p)] for p in decay["params"]}
    assert all(n.endswith(("bias", "norm.weight")) for n in (names[id(p)] for p in no_decay["params"]))


def _serial_gradients() -> tuple[GPTModel, torch.Tensor]:
    model = GPTModel(CFG, seed=4)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return model, torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])


def _check_norm_under_tp():
    with state.use(state.SERIAL):
        _, expected = _serial_gradients()
    model = GPTModel(CFG, seed=4)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    params = list(model.parameters())
    torch.testing.assert_close(grad_norm(params, state.current()), expected)
    before = clip_gradients_(params, max_norm=0.5 * expected.item(), grid=state.current())
    torch.testing.assert_close(before, expected)
    torch.testing.assert_close(grad_norm(params, state.current()), 0.5 * expected, rtol=1e-5, atol=0)


def test_global_grad_norm_under_tp_counts_replicated_parameters_once():
    run_on_ranks(2, _check_norm_under_tp)


def test_clipping_is_a_no_op_below_the_threshold_and_at_zero():
    model, norm = _serial_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    clip_gradients_(list(model.parameters()), max_norm=10 * norm.item(), grid=state.SERIAL)
    clip_gradients_(list(model.parameters()), max_norm=0.0, grid=state.SERIAL)
    for p, g in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)


def test_loss_scaler_skips_and_halves_on_overflow_and_grows_after_clean_steps():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True)
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([8.0, 16.0, 24.0])
    found_inf = scaler.unscale_([p])
    assert found_inf.item() == 0.0 and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    scaler.step(optimizer, found_inf)
    assert scaler.scale.item() == 8.0 and not torch.equal(p.detach(), torch.ones(3))  # a step was taken
    p.grad = torch.tensor([8.0, 8.0, 8.0])
    scaler.step(optimizer, scaler.unscale_([p]))
    assert scaler.scale.item() == 16.0  # two clean steps in a row
    taken, moments = p.detach().clone(), optimizer.state[p]["exp_avg"].clone()
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    found_inf = scaler.unscale_([p])
    assert found_inf.item() == 1.0
    scaler.step(optimizer, found_inf)
    assert torch.equal(p.detach(), taken) and torch.equal(optimizer.state[p]["exp_avg"], moments)  # skipped
    assert optimizer.state[p]["step"].item() == 2 and not hasattr(optimizer, "found_inf")
    assert scaler.state_dict() == {"scale": 8.0, "clean_steps": 0}
    scaler.scale.fill_(1.0)
    scaler.step(optimizer, torch.ones(()))
    assert scaler.scale.item() == 1.0  # never below min_scale
    restored = DynamicLossScaler()
    restored.load_state_dict({"scale": 8.0, "clean_steps": 1})
    assert restored.state_dict() == {"scale": 8.0, "clean_steps": 1}
