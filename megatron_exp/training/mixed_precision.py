"""Mixed precision the Megatron way: low-precision (bf16/fp16) parameters, fp32 main gradients and main weights.

With `hardware.params=low` the model holds its parameters in the compute precision's dtype (2 bytes each; the
forward and backward run in it). What the optimizer steps is a copy in the dtype the model was built in (fp32):
its main weights, so updates far below a bf16 weight's resolution (8 bits of mantissa) still add up. Backward
accumulates each parameter's gradient into its main gradient, a view of one flat buffer of the main dtype that
lives for the run, through a hook that frees the low-precision gradient at once. So the DP reduction, the fp16
unscale and overflow check, clipping and AdamW all see fp32 gradients, as with fp32 parameters; after the step the
parameters are cast from the main weights. Per parameter: 2 (weight) + 4 (main gradient) + 4 (main weight) + 8
(Adam's moments) = 18 bytes; with the distributed optimizer, which keeps main weights and moments for its DP slice
only, 2 + 4 + 12/dp.

Checkpoints hold the main weights as the model's weights (`state_with_main_weights`): the same fp32 state dict
as an fp32 run's, so a checkpoint loads at any precision and layout, and a resume restores the main weights
exactly (the parameters are their cast).

The code is generic in the dtypes: parameters of one dtype, main weights in the one the model was built in (the
tests build fp64 models and keep fp32 parameters, where the arithmetic is exact enough to compare step by step).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_exp.config import OptimizerConfig
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training.optim import DynamicLossScaler, adamw, optimizer_order, optimizer_step


def accumulate_in_main_grad(param: nn.Parameter, main_grad: torch.Tensor) -> None:
    """Make backward add `param`'s gradient into `main_grad` (wider, of its shape) and free the narrow one."""
    param.main_grad = main_grad
    param.register_post_accumulate_grad_hook(_add_to_main_grad)


def _add_to_main_grad(param: nn.Parameter) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


def gradient(param: nn.Parameter) -> torch.Tensor | None:
    """The gradient that ranks reduce and the optimizer reads: a low-precision parameter's main gradient, else its
    own."""
    main = getattr(param, "main_grad", None)
    return param.grad if main is None else main


def state_with_main_weights(model: nn.Module, main: dict[str, torch.Tensor]) -> dict:
    """`model.state_dict()` with each parameter's entry, under every name it has, its main weight (`main`: by the
    names that named_parameters gives)."""
    by_id = {id(p): main[name].detach() for name, p in model.named_parameters()}  # plain tensors, no tags
    state = model.state_dict()
    for name, p in model.named_parameters(remove_duplicate=False):
        state[name] = by_id[id(p)]
    return state


class MainWeightsOptimizer:
    """The plain optimizer (every rank keeps all of Adam's state) stepping main weights of parameters cast to
    `dtype`. Its state dict is the plain AdamW one, in build_optimizer's order: checkpoints of either precision
    load into either."""

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, grid: ProcessGrid, dtype: torch.dtype):
        self.model, self.grid = model, grid
        named = dict(model.named_parameters())
        self.names = optimizer_order(model)
        self.parameters = [named[name] for name in self.names]
        first = self.parameters[0]
        self.grads = torch.zeros(sum(p.numel() for p in self.parameters), dtype=first.dtype, device=first.device)
        self.main, offset = [], 0
        with torch.no_grad():
            for p in self.parameters:
                main = nn.Parameter(p.detach().clone())
                main.__dict__.update(vars(p))  # the shard spec and tags: the norm counts a main weight as its param
                main.grad = self.grads[offset : offset + p.numel()].view_as(p)
                accumulate_in_main_grad(p, main.grad)
                p.data = p.data.to(dtype)
                self.main.append(main)
                offset += p.numel()
        self.optimizer = adamw(self.main, cfg)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def step(self, clip_grad: float, scaler: DynamicLossScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """After GradientSync: what optim.optimizer_step does, on the main weights; then the parameters are cast
        from them and the main gradients zeroed."""
        result = optimizer_step(self.optimizer, self.main, clip_grad, self.grid, scaler, free_grads=False)
        with torch.no_grad():
            for p, main in zip(self.parameters, self.main, strict=True):
                p.copy_(main)
        self.grads.zero_()
        return result

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def main_state_dict(self) -> dict:
        """The model's state dict with the main weights for its parameters (what a checkpoint saves)."""
        return state_with_main_weights(self.model, dict(zip(self.names, self.main, strict=True)))

    def load_main_weights(self, state: dict) -> None:
        """Set the main weights from a model state dict (the parameters were loaded from it: they are its cast)."""
        with torch.no_grad():
            for name, main in zip(self.names, self.main, strict=True):
                main.copy_(state[name])
