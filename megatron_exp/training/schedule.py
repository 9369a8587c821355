"""How one rank runs the micro-batches of a step: `MicroBatches` without a pipeline (forward and backward each
micro-batch in turn, gradients accumulating in place), `Pipeline` for one stage of a pipeline. Every schedule
returns the loss terms summed over the step's micro-batches, each divided by their count: the
step's mean terms, on the device (the step never waits for the host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist

from megatron_exp.models.contract import Batch, Model
from megatron_exp.parallel.pipeline import Action, PipelineLayout, actions, forward_only
from megatron_exp.parallel.state import ProcessGrid


class MicroBatches:
    def __init__(
        self,
        model: Model,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: torch.Tensor | None = None,
    ):
        """`loss_scale` is fp16's dynamic loss scale, read at every backward."""
        self.model, self.autocast, self.loss_scale = model, autocast, loss_scale

    def train(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """Forward and backward every micro-batch; the step's mean loss terms."""
        count = len(batches)
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            batch = batch.to(self.model.device)
            with self.autocast():
                outputs = self.model(**batch.inputs)
            terms = self.model.loss_terms(outputs, **batch.targets)
            del outputs  # the logits: autograd keeps what backward needs, and they would be live through it
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


class Pipeline:
    """The step of one pipeline stage: its chunks' forward and backward passes in the schedule's order
    (parallel/pipeline.py), activations received from the previous chunk's stage and sent to the next one's.

    Sends are asynchronous and receives block, so a stage waits only for what its next action needs; activations
    go forward on the PP group and gradients back on a second one, so the two directions never queue behind each
    other (NCCL runs a group's transfers in order). Each stage reads its own copy of every micro-batch (the data
    is the same on every rank): only [micro_batch, seq, hidden] activations and their gradients travel
    ([micro_batch, seq / tp, hidden] sequence shards with sequence parallelism). The loss terms exist on the last
    stage; the others return zeros, and the metrics sum them over the PP group.
    """

    def __init__(
        self,
        model: Model,
        grid: ProcessGrid,
        layout: PipelineLayout,
        schedule: str,
        autocast: Callable[[], AbstractContextManager],
        loss_scale: torch.Tensor | None = None,
    ):
        self.model, self.grid, self.layout, self.schedule = model, grid, layout, schedule
        self.autocast, self.loss_scale = autocast, loss_scale
        self.stage, self.last = grid.pp.rank, layout.chunks - 1
        self.pending: list = []  # sends in flight (their tensors stay alive until they complete)

    def _send(self, tensor: torch.Tensor, chunk: int, forward: bool) -> None:
        group = self.grid.pp.handle if forward else self.grid.pp_backward
        # completed sends let their tensors go: held to the step's end, a stage would keep every micro-batch's
        self.pending = [(work, sent) for work, sent in self.pending if not work.is_completed()]
        self.pending.append(
            (dist.isend(tensor.contiguous(), group=group, group_dst=self.layout.stage_of(chunk)), tensor)
        )

    def _receive(self, like: torch.Size, chunk: int, forward: bool) -> torch.Tensor:
        group = self.grid.pp.handle if forward else self.grid.pp_backward
        buffer = torch.empty(like, dtype=self.model.dtype, device=self.model.device)
        dist.irecv(buffer, group=group, group_src=self.layout.stage_of(chunk)).wait()
        return buffer

    def _forward(
        self, action: Action, batch: Batch, forward: Callable | None = None
    ) -> tuple[torch.Tensor | None, object]:
        """(the chunk's input activation or None, its output): `forward` (default: the model's) of the chunk."""
        hidden = None
        if action.chunk > 0:
            hidden = self._receive(self.model.hidden_shape(batch.inputs["tokens"]), action.chunk - 1, forward=True)
            hidden.requires_grad_(torch.is_grad_enabled())
        with self.autocast():
            output = (forward or self.model)(**batch.inputs, hidden=hidden, chunk=action.chunk)
        if action.chunk < self.last:
            self._send(output.detach(), action.chunk + 1, forward=True)
        return hidden, output

    def _or_zeros(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The last stage's sums; zeros on the others."""
        return sums or {name: torch.zeros((), device=self.model.device) for name in self.model.loss_term_names}

    def train(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        count = len(batches)
        batches = [batch.to(self.model.device) for batch in batches]
        kept: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        sums: dict[str, torch.Tensor] = {}
        for action in actions(self.layout, self.schedule, count, self.stage):
            key, batch = (action.chunk, action.micro), batches[action.micro]
            if action.forward:
                hidden, output = self._forward(action, batch)
                if action.chunk == self.last:
                    terms = self.model.loss_terms(output, **batch.targets)
                    output = terms["loss"] / count
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0) + (output.detach() if name == "loss" else value.detach() / count)
                    if self.loss_scale is not None:
                        output = output * self.loss_scale
                kept[key] = hidden, output
                continue
            hidden, output = kept.pop(key)
            if action.chunk == self.last:
                output.backward()
            else:
                torch.autograd.backward(output, self._receive(output.shape, action.chunk + 1, forward=False))
            if hidden is not None:
                self._send(hidden.grad, action.chunk - 1, forward=False)
        self._finish_sends()
        return self._or_zeros(sums)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """Forward only, micro-batch after micro-batch through this stage's chunks; the last stage's loss terms
        summed over `batches` (zeros on the other stages)."""
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for action in forward_only(self.layout, len(batches), self.stage):
            batch = batches[action.micro].to(self.model.device)
            _, output = self._forward(action, batch)
            if action.chunk == self.last:
                for name, value in self.model.loss_terms(output, **batch.targets).items():
                    sums[name] = sums.get(name, 0) + value.detach()
        self._finish_sends()
        self.model.train()
        return self._or_zeros(sums)

    @torch.no_grad()
    def outputs(self, batch: Batch, forward: Callable | None = None) -> object | None:
        """One batch forward through the pipeline: the last chunk's output (e.g. the logits) on the last stage,
        None on the others. For evaluations that need more than the loss terms, and generation, whose `forward`
        (taking the batch's inputs, `hidden` and `chunk`, like the model's) stops at the final hidden states."""
        last_output = None
        for action in forward_only(self.layout, 1, self.stage):
            _, output = self._forward(action, batch.to(self.model.device), forward)
            if action.chunk == self.last:
                last_output = output
        self._finish_sends()
        return last_output

    def _finish_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []
