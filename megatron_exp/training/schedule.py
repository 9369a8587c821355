"""How one rank runs the micro-batches of a step: the part of a training step that pipeline parallelism replaces.

`MicroBatches` is the schedule without a pipeline: forward and backward each micro-batch in turn, gradients
accumulating in place, and DDP (when the DP group is larger than one) reducing them during the last backward.
Every schedule returns the loss terms summed over the step's micro-batches, each divided by their count: the
step's mean terms, on the device (the step never waits for the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from megatron_exp.models.contract import Batch, Model


class MicroBatches:
    def __init__(
        self,
        model: Model,
        forward: nn.Module,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: torch.Tensor | None = None,
    ):
        """`forward` is the module called for the forward pass (the model, or its DDP wrapper); `loss_scale` is
        fp16's dynamic loss scale, read at every backward."""
        self.model, self.forward, self.autocast, self.loss_scale = model, forward, autocast, loss_scale

    def train(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """Forward and backward every micro-batch; the step's mean loss terms."""
        count = len(batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            batch = batch.to(self.model.device)
            last = i == count - 1
            sync = nullcontext() if last or self.forward is self.model else self.forward.no_sync()
            with sync:
                with self.autocast():
                    outputs = self.forward(**batch.inputs)
                terms = self.model.loss_terms(outputs, **batch.targets)
                loss = terms["loss"] / count
                (loss * self.loss_scale if self.loss_scale is not None else loss).backward()
            for name, value in terms.items():
                share = loss.detach() if name == "loss" else value.detach() / count
                sums[name] = sums.get(name, 0) + share
        return sums

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """Forward only (the model in eval mode); the loss terms summed over `batches`, in order."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            batch = batch.to(self.model.device)
            with self.autocast():
                outputs = self.model(**batch.inputs)
            for name, value in self.model.loss_terms(outputs, **batch.targets).items():
                sums[name] = sums.get(name, 0) + value.detach()
        self.model.train()
        return sums
