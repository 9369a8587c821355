"""What the training core and the evaluations rely on from a model, declared once.

A batch is two dicts of tensors: `inputs`, the keyword arguments of the model's forward, and `targets`, the keyword
arguments its loss takes besides the forward's outputs. The first dimension of every tensor is the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from megatron_exp.config import ModelConfig
from megatron_exp.parallel.state import Group


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> Batch:
        def move(tensors):
            return {k: t.to(device, non_blocking=True) for k, t in tensors.items()}

        return Batch(move(self.inputs), move(self.targets))


@runtime_checkable
class Model(Protocol):
    """A trainable model of this project: GPT, BERT, BERT for multiple choice."""

    cfg: ModelConfig
    tp: Group
    # The loss term whose exp is a perplexity (GPT: "loss", BERT: "mlm_loss"), or None (a classifier).
    perplexity_term: str | None
    loss_term_names: tuple[str, ...]  # the keys of loss_terms (a pipeline's other stages report zeros for them)

    @property
    def device(self) -> torch.device:
        """Where the parameters live (and so where a batch must be)."""

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (and that of the activations between pipeline stages)."""

    def forward(self, **inputs: torch.Tensor) -> Any:
        """The outputs that `loss_terms` takes (e.g. this rank's vocabulary slice of the logits). A model that
        can be split into pipeline stages also takes `hidden` (the previous chunk's output) and `chunk`, and
        tells that output's shape with `hidden_shape(tokens)`."""

    def loss_terms(self, outputs: Any, **targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalar means over the micro-batch, the same on every TP rank; "loss" is what training minimizes."""
