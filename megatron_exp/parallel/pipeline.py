"""Pipeline model parallelism (Narayanan et al., 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM"): which layers each stage holds, and in which order each stage runs its micro-batches.

The layers are cut into `stages x virtual` equal chunks. Chunk c lives on stage c % stages, so with virtual
stages (interleaving) stage s holds chunks s, s + stages, s + 2 stages, ...: a micro-batch visits every stage
`virtual` times, and the pipeline fills `virtual` times faster. The first chunk holds the embeddings, the last
the final layernorm, the output layer (tied to the word embedding, whose gradient the embedding group sums) and
the loss.

A schedule is, for each stage, the ordered list of its actions: forward or backward of (chunk, micro-batch).
Bubble: the idle fraction of a step, (p - 1) / (v m) for m micro-batches (both 1F1B schedules); GPipe has the
same bubble but keeps all m micro-batches' activations, 1F1B at most p - stage on a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class Action(NamedTuple):
    forward: bool
    chunk: int  # global chunk index
    micro: int

    def __str__(self) -> str:
        return f"{self.chunk}{'F' if self.forward else 'B'}{self.micro}"


@dataclass(frozen=True)
class ModelPart:
    """What one stage builds of the model: its chunks (global chunk index -> global layer indices) out of
    `count`, so it holds the embeddings if it has the first chunk and the head and loss if it has the last."""

    chunks: dict[int, range]
    count: int = 1

    @property
    def layers(self) -> list[int]:
        return [i for chunk in self.chunks.values() for i in chunk]

    @property
    def embeddings(self) -> bool:
        return 0 in self.chunks

    @property
    def head(self) -> bool:
        return self.count - 1 in self.chunks


def whole(layers: int) -> ModelPart:
    """The whole model on one stage."""
    return ModelPart({0: range(layers)})


@dataclass(frozen=True)
class PipelineLayout:
    stages: int = 1
    virtual: int = 1
    layers: int = 1

    @property
    def chunks(self) -> int:
        return self.stages * self.virtual

    def chunk_layers(self, chunk: int) -> range:
        per = self.layers // self.chunks
        return range(chunk * per, (chunk + 1) * per)

    def stage_of(self, chunk: int) -> int:
        return chunk % self.stages

    def chunks_of(self, stage: int) -> list[int]:
        return [stage + k * self.stages for k in range(self.virtual)]

    def part(self, stage: int) -> ModelPart:
        return ModelPart({c: self.chunk_layers(c) for c in self.chunks_of(stage)}, self.chunks)

    def split_problem(self) -> str | None:
        """Why the layers cannot be cut into this layout's chunks, or None."""
        if self.layers % self.chunks:
            return (
                f"model.layers={self.layers} is not divisible by parallel.pp x parallel.virtual_stages = "
                f"{self.stages} x {self.virtual}: each chunk needs the same number of layers"
            )
        return None

    def validate(self, micro_batches: int, schedule: str) -> str | None:
        """Why this layout cannot run `schedule` over `micro_batches`, or None."""
        if self.split_problem():
            return self.split_problem()
        if self.virtual > 1 and schedule != "interleaved":
            return f"parallel.virtual_stages={self.virtual} needs parallel.schedule=interleaved"
        if schedule == "interleaved" and self.stages > 1 and micro_batches % self.stages:
            return (
                f"parallel.schedule=interleaved needs the micro-batches per step ({micro_batches} = global_batch / "
                f"(micro_batch x dp)) to be a multiple of parallel.pp={self.stages}"
            )
        return None


def bubble_fraction(stages: int, virtual: int, micro_batches: int) -> float:
    """The analytic pipeline bubble, (p - 1) / (v m): the share of a step a stage waits."""
    return (stages - 1) / (virtual * micro_batches)


def actions(layout: PipelineLayout, schedule: str, micro_batches: int, stage: int) -> list[Action]:
    """The order in which `stage` runs forward and backward passes in one training step."""
    p, m = layout.stages, micro_batches
    if schedule == "gpipe":
        return [Action(True, stage, i) for i in range(m)] + [Action(False, stage, i) for i in range(m)]
    if layout.virtual == 1:  # 1F1B (interleaving needs virtual stages)
        warmup = min(p - stage - 1, m)
        order = [Action(True, stage, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Action(True, stage, warmup + i), Action(False, stage, i)]
        return order + [Action(False, stage, i) for i in range(m - warmup, m)]
    return _interleaved(layout, m, stage)


def _interleaved(layout: PipelineLayout, m: int, stage: int) -> list[Action]:
    """Interleaved 1F1B: virtual steps k = 0 .. v m - 1, in groups of p micro-batches per chunk."""
    p, v = layout.stages, layout.virtual
    total = m * v

    def action(k: int, forward: bool) -> Action:
        local = (k % (p * v)) // p
        if not forward:
            local = v - 1 - local
        return Action(forward, stage + local * p, (k // (p * v)) * p + k % p)

    warmup = total if m == p else min((p - stage - 1) * 2 + (v - 1) * p, total)
    order = [action(k, True) for k in range(warmup)]
    for i in range(total - warmup):
        order += [action(warmup + i, True), action(i, False)]
    return order + [action(k, False) for k in range(total - warmup, total)]


def forward_only(layout: PipelineLayout, micro_batches: int, stage: int) -> list[Action]:
    """Evaluation: every micro-batch through this stage's chunks in turn (no backward, nothing kept)."""
    return [Action(True, c, i) for i in range(micro_batches) for c in layout.chunks_of(stage)]


def peak_in_flight(layout: PipelineLayout, schedule: str, micro_batches: int, stage: int) -> int:
    """The most chunk forwards `stage` holds activations of at once (forwarded, not yet backwarded): what its
    activation memory scales with. Without a pipeline, one micro-batch at a time."""
    if layout.stages == 1:
        return 1
    live = peak = 0
    for action in actions(layout, schedule, micro_batches, stage):
        live += 1 if action.forward else -1
        peak = max(peak, live)
    return peak
