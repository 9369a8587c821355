"""Adam with decoupled weight decay, the warmup + decay schedule, TP-aware clipping, and fp16 loss scaling."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatron_exp.config import OptimizerConfig
from megatron_exp.parallel.mappings import all_reduce_
from megatron_exp.parallel.sharding import ShardSpec
from megatron_exp.parallel.state import ProcessGrid


def decayed(param: torch.Tensor) -> bool:
    """Whether weight decay applies: biases and layernorm parameters (every 1-D parameter) are not decayed."""
    return param.dim() > 1


def optimizer_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """The names of the parameters in the optimizer's two groups: decayed, not decayed."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [name for name, p in named if decayed(p)], [name for name, p in named if not decayed(p)]


def optimizer_order(model: nn.Module) -> list[str]:
    """The names of the parameters in the order of the optimizer's state indices."""
    decayed_names, rest = optimizer_groups(model)
    return decayed_names + rest


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW on the model's parameters; biases and layernorm parameters (every 1-D parameter) are not decayed."""
    return adamw(model.parameters(), cfg)


def adamw(parameters: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW on `parameters` in two groups, decayed and not (every 1-D parameter), in their order."""
    parameters = [p for p in parameters if p.requires_grad]
    decay = [p for p in parameters if decayed(p)]
    no_decay = [p for p in parameters if not decayed(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel, on GPU and CPU alike: on this CPU it steps a 25M-parameter model 4x faster than the
    # multi-tensor (foreach) path (21 ms vs 83 ms).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def learning_rate(cfg: OptimizerConfig, iteration: int, total_iterations: int) -> float:
    """Linear warmup from 0 over warmup_iters, then cosine (or linear) decay to min_lr at decay_iters, then flat.

    `iteration` counts optimizer steps from 1.
    """
    if iteration <= cfg.warmup_iters:
        return cfg.lr * iteration / max(1, cfg.warmup_iters)
    if cfg.decay_style == "constant":
        return cfg.lr
    decay_iters = cfg.decay_iters or total_iterations
    progress = min(1.0, (iteration - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    fraction = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay_style == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * fraction


def squared_norm(pieces: list[tuple[nn.Parameter, torch.Tensor]], grid: ProcessGrid) -> torch.Tensor:
    """What these gradients (each with its parameter; a piece of a gradient counts as its parameter's) add to the
    squared global norm on this rank: TP-split parameters contribute their slice on every TP rank; replicated ones
    (identical on all TP ranks) are counted on TP rank 0 only; the last stage's copy of the tied word embedding is
    left out (the first stage counts it). Summed in fp32, or in the gradients' dtype where it is wider (fp64)."""
    counted = [(p, g) for p, g in pieces if not getattr(p, "pipeline_copy", False)]
    split = [g for p, g in counted if ShardSpec.of(p).dim is not None]
    replicated = [g for p, g in counted if ShardSpec.of(p).dim is None]
    device = pieces[0][1].device if pieces else None
    wide = torch.promote_types(pieces[0][1].dtype, torch.float32) if pieces else torch.float32
    squares = torch.zeros((), device=device, dtype=wide)
    if split:
        squares += torch.nn.utils.get_total_norm(split).to(wide) ** 2
    if replicated and grid.tp.rank == 0:
        squares += torch.nn.utils.get_total_norm(replicated).to(wide) ** 2
    return squares


def grad_norm(parameters: list[nn.Parameter], grid: ProcessGrid) -> torch.Tensor:
    """Global L2 norm of the gradients of the whole (unsplit) model, the same on every rank: `squared_norm` summed
    over TP and the pipeline stages. DP replicas hold identical averaged gradients."""
    pieces = [(p, p.grad) for p in parameters if p.grad is not None]
    if not pieces:
        return torch.zeros(())
    return all_reduce_(all_reduce_(squared_norm(pieces, grid), grid.tp), grid.pp).sqrt()


def clip_gradients_(parameters: list[nn.Parameter], max_norm: float, grid: ProcessGrid) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (no-op for 0); returns the norm before."""
    norm = grad_norm(parameters, grid)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    parameters: list[nn.Parameter],
    clip_grad: float,
    grid: ProcessGrid,
    scaler: DynamicLossScaler | None = None,
    free_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale (fp16) and clip the gradients, step, free them (`free_grads`; else the caller zeroes them: main
    gradients live in a buffer that backward hooks accumulate into, training/mixed_precision.py). Returns the
    gradient norm (0.0 for a skipped step, whose norm is inf/nan) and 1.0 where an fp16 overflow skipped the step
    (else 0.0), both on the device: the step never waits for the host."""
    skipped = scaler.unscale_(parameters) if scaler else torch.zeros((), device=parameters[0].device)
    norm = clip_gradients_(parameters, clip_grad, grid)
    if scaler:
        scaler.step(optimizer, skipped)
    else:
        optimizer.step()
    if free_grads:
        optimizer.zero_grad(set_to_none=True)
    return torch.where(skipped > 0, 0.0, norm), skipped


class DynamicLossScaler:
    """fp16 loss scaling without host syncs: the scale, the count of clean steps and the overflow flag stay on the
    device. On overflow (on any rank) the optimizer skips its update and the scale halves; after
    `growth_interval` clean steps in a row it doubles. Only logging and checkpoints read the scale back."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        initial_scale: float = 2.0**16,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ):
        self.scale = torch.tensor(initial_scale, dtype=torch.float32, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval, self.min_scale = growth_interval, min_scale

    def unscale_(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        """Divide the gradients by the scale (one fused pass that also looks for inf/nan); returns the overflow
        flag, 1.0 where some rank's gradients overflowed, else 0.0, as a device tensor."""
        grads = [p.grad for p in parameters if p.grad is not None]
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.reciprocal())
        if dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return found_inf

    def step(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        """The optimizer's update, skipped inside its fused kernel where `found_inf` is set; then the new scale."""
        optimizer.found_inf = found_inf  # read by the fused Adam kernel, as torch.amp.GradScaler does
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        torch._amp_update_scale_(self.scale, self.clean_steps, found_inf, 2.0, 0.5, self.growth_interval)
        self.scale.clamp_(min=self.min_scale)

    def state_dict(self) -> dict:
        return {"scale": self.scale.item(), "clean_steps": int(self.clean_steps.item())}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["scale"])
        self.clean_steps.fill_(state["clean_steps"] % self.growth_interval)
