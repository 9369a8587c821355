"""`python -m megatron_exp.plan [the same overrides as train]`: will this config fit, and what will it cost?

Builds one rank's shard on the meta device (nothing allocated) and prints, per rank: parameters; memory for
weights, gradients and optimizer state; activation memory at the configured micro batch for each
`parallel.recompute` mode; FLOPs per iteration; and whether it fits the device.

The state (preflight.state_bytes_per_parameter): fp32 parameters (`hardware.params=fp32`, autocast running
bf16/fp16) are their own main weights, 4 + 4 + 8 bytes per parameter; bf16/fp16 parameters (`hardware.params=low`,
the default on GPU) are 2 bytes, with an fp32 main gradient, main weight and Adam's moments: 2 + 4 + 4 + 8 = 18
(training/mixed_precision.py). With `parallel.distributed_optimizer=true` each DP rank keeps 1/dp of the moments
and main weights: 4 + 4 + 8/dp, or 2 + 4 + 12/dp.

Activations are what autograd keeps for backward in this implementation, measured and then written down here
(tests/test_plan.py checks the estimate against a measurement at tp=1 and 2, with and without sequence
parallelism, and at pp=2). Per layer, TP degree t, and r = 1/t with `parallel.sequence_parallel` (else 1), the
share of the sequence a rank keeps of what lies outside the TP regions; in elements of the matmuls' dtype (P: of the
parameters' and the residual stream's: fp32, or bf16/fp16 with `hardware.params=low`):
    b s h r x 2 (P)      layer input and the residual between attention and MLP (what the layernorms save)
  + b s h r x 2          the two layernorm outputs (the QKV and first MLP matmuls save only this rank's shard under
                         SP and gather it again in backward)
  + b s h 12/t           q/k/v, attention output, the MLP's two 4h tensors
  + b (a/t) s            fused attention's row statistics (fp32; it keeps no s x s scores)
  + 12 h^2 / t           under bf16/fp16 autocast, the low-precision copies of the fp32 weights that each matmul
                         saves, for every micro-batch in flight (measured with CPU autocast, which casts as CUDA's)
With dropout on: 2 masks of b s h r per layer (+1 after the embedding), 4 bytes each on CPU, 1 on GPU; and on CPU,
where the fused attention kernel has no dropout, the math path keeps 12 bytes per score: b (a/t) s^2 x 12.
Outside the layers: the final layernorm's input (P) and output (b s h r each: the tied output layer saves the shard
and gathers it into its matmul; under autocast also its copy of the word embedding, V/t x h), and the vocab-parallel
loss's softmax (b s V/t, fp32, the whole sequence); before the last pipeline stage, each chunk's output (b s h r, P),
which the schedule keeps to run backward from the next stage's gradient.
With `parallel.recompute=selective` a layer keeps all of that except what the attention core (QK^T, softmax,
attention dropout, attention over V) saves: its row statistics and, on CPU with attention dropout, the math
path's b (a/t) s^2 x 12 bytes; q/k/v stay (the recomputation's inputs) and so does the attention output (the
output projection's input). One layer's core is live again during its backward. With `full` each layer keeps only
its input (b s h r, P), plus one layer's full set live during its recomputation.

Against Korthikanti et al. 2022 (bf16, 1-byte masks, per layer): s b h (34 + 5 a s / h) without SP or
recomputation is s b h (10 + 24/t + 5 a s / (h t)) at TP degree t, and here s b h (10 + 24/t) + 4 b (a/t) s: the
5 a s / h is the s x s scores, softmax output and its dropout mask, which the fused attention never keeps. With SP
this is 34 s b h / t plus the row statistics, and with SP + selective exactly the paper's 34 s b h / t: selective
recomputation saves almost nothing on GPU here, because there is almost nothing left for it to free. With full
recomputation, 2 s b h per layer (2 s b h / t with SP, where each layer's input is a shard). All of these assume
bf16 parameters, as Megatron has and `hardware.params=low` (the GPU default) gives; fp32 parameters under autocast
add the fp32 residual's 4 s b h r, a 4-byte input with full recomputation, and the weights' bf16 copies, 24 h^2 / t
bytes per layer and micro-batch in flight (for GPT-3 175B at tp=8, 453 MB a layer).

The per-rank total is the step's peak, not a sum of everything: weights and Adam's state always, plus the largest of
  - the forward's end: every activation in flight, the output layer's logits (b s V/t) beside the loss's fp32
    softmax copy, and the gradients when micro-batches accumulate into them (they are freed after each step);
  - the backward through the output layer and then the top layer: the activations, the gradients (accumulating) or
    the first one backward makes, the word embedding's (V/t x h), and the top layer recomputed once the head's
    tensors are freed;
  - the backward through the lowest layer: the other micro-batches' activations in flight, that layer's and its
    recomputed set, and every gradient (at one micro-batch a step with full recomputation, usually the largest);
  - the optimizer step: the gradients (the fused AdamW allocates nothing more).
The distributed optimizer's gradients and low-precision parameters' main gradients live in one flat buffer for the
whole run: they count as resident (the bf16/fp16 gradient that backward makes first, the word embedding's, still
lives until its hook adds it to its main gradient).
In a pipeline, the stage with the largest total is reported (the first holds the most micro-batches in flight,
the last the head and the tied embedding's copy). tests/test_plan.py checks this against the measured peak of
real training steps (`measure_step_peak_bytes`): serial, tp=2 with and without SP, dp=2 with the distributed
optimizer, 1F1B at pp=2, and bf16 parameters, each recompute mode (all within 2.5% of measured, most within 0.5%).
A smaller stage can be overestimated by up to 15%: with as many micro-batches as stages, stage 0's in-flight peak
comes before its first backward has made any gradient, which the forward's end counts when micro-batches
accumulate.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_exp import entry, preflight
from megatron_exp.config import RECOMPUTE_MODES, Config
from megatron_exp.parallel.pipeline import bubble_fraction, peak_in_flight
from megatron_exp.parallel.sharding import padded_vocab_size
from megatron_exp.training.flops import hardware_flops, model_flops

log = logging.getLogger("megatron_exp.plan")


def _sizes(cfg: Config) -> tuple[int, int, int, int, int]:
    m = cfg.model
    return cfg.parallel.micro_batch, cfg.data.seq_len or m.seq_len, m.hidden, m.heads, cfg.parallel.tp


def _sequence_share(cfg: Config) -> float:
    """The share of the sequence that the activations outside TP regions cover on a rank: 1/tp with sequence
    parallelism (a model built with it at tp=1 is the plain one), else all of it."""
    tp = cfg.parallel.tp
    return 1 / tp if cfg.parallel.sequence_parallel and tp > 1 else 1


def _mask_bytes(cfg: Config) -> float:
    """One dropout mask on the residual stream (this rank's sequence shard with sequence parallelism)."""
    b, s, h, _, _ = _sizes(cfg)
    if cfg.model.hidden_dropout == 0:
        return 0
    return (4 if cfg.hardware.device != "cuda" else 1) * b * s * h * _sequence_share(cfg)


def _parameter_bytes(cfg: Config) -> int:
    """Bytes of a parameter, and so of the residual stream whose dtype they set: bf16/fp16 with
    `hardware.params=low`, else fp32 (autocast then runs only the matmuls in bf16/fp16)."""
    return 2 if cfg.hardware.params == "low" else 4


def _element(cfg: Config) -> int:
    """Bytes of an element in the matmuls' dtype (autocast's under bf16/fp16)."""
    return 4 if cfg.hardware.precision in ("fp32", "auto") else 2


def _weight_copies(cfg: Config, weights: float) -> float:
    """The low-precision copies of fp32 `weights` that autocast's matmuls save for backward, one per micro-batch
    (none where the parameters already have the matmuls' dtype)."""
    return weights * _element(cfg) if _element(cfg) < _parameter_bytes(cfg) else 0


def _attention_core_bytes(cfg: Config) -> float:
    """What the attention core saves beyond its inputs and output: what selective recomputation frees."""
    b, s, _, a, tp = _sizes(cfg)
    kept = b * (a / tp) * s * 4
    if cfg.hardware.device != "cuda" and cfg.model.attention_dropout > 0:
        kept += b * (a / tp) * s * s * 12
    return kept


def layer_activation_bytes(cfg: Config, recompute: str = "none") -> float:
    """What one transformer layer keeps for backward under `recompute` (none | selective | full)."""
    b, s, h, _, tp = _sizes(cfg)
    share, element = _sequence_share(cfg), _element(cfg)
    if recompute == "full":
        return b * s * h * share * _parameter_bytes(cfg)
    # the layer input and mid residual (the parameters' dtype), the layernorm outputs (the matmuls')
    residual = b * s * h * share * (2 * _parameter_bytes(cfg) + 2 * element)
    kept = residual + b * s * h * 12 / tp * element + 2 * _mask_bytes(cfg) + _weight_copies(cfg, 12 * h * h / tp)
    return kept if recompute == "selective" else kept + _attention_core_bytes(cfg)


def _recomputed_bytes(cfg: Config, recompute: str) -> float:
    """What is live again while backward recomputes one layer (selective: its attention core)."""
    return {"none": 0, "selective": _attention_core_bytes(cfg), "full": layer_activation_bytes(cfg)}[recompute]


def _stage_activations(cfg: Config, recompute: str, stage: int) -> tuple[float, float, int]:
    """(what one chunk forward keeps on pipeline stage `stage`, the part of it that the head keeps, how many chunk
    forwards the schedule has in flight there at most)."""
    b, s, h, _, tp = _sizes(cfg)
    layout = preflight.pipeline_layout(cfg)
    part = layout.part(stage)
    head = 0.0
    if part.head:  # the final layernorm's input and output, the loss's softmax
        vocab_part = padded_vocab_size(cfg.model.vocab_size, tp) / tp
        head = b * s * h * _sequence_share(cfg) * (_parameter_bytes(cfg) + _element(cfg)) + b * s * vocab_part * 4
        head += _weight_copies(cfg, vocab_part * h)  # the tied output layer's
    embeddings = _mask_bytes(cfg) if part.embeddings else 0  # the embedding's dropout
    # before the last stage, the chunk's output: the schedule keeps it to run backward from the next one's gradient
    output = 0 if part.head else b * s * h * _sequence_share(cfg) * _parameter_bytes(cfg)
    one = len(part.layers) / len(part.chunks) * layer_activation_bytes(cfg, recompute) + head + embeddings + output
    in_flight = peak_in_flight(layout, cfg.parallel.schedule, preflight.micro_batches(cfg), stage)
    return one, head, in_flight


def activation_bytes(cfg: Config, recompute: str, peak: bool = True, stage: int = 0) -> float:
    """Activation memory of pipeline stage `stage` (the whole model without a pipeline): what its chunks keep for
    the micro-batches in flight at once under the schedule (one without a pipeline), the embeddings' and the
    loss's tensors where the stage holds them, plus (`peak`) what is live again while one layer is recomputed in
    backward."""
    one, _, in_flight = _stage_activations(cfg, recompute, stage)
    return in_flight * one + (_recomputed_bytes(cfg, recompute) if peak else 0)


def step_peak_bytes(cfg: Config, per_rank: int, stage: int = 0) -> float:
    """What a training step on a rank of `stage` (holding `per_rank` parameters) holds at its peak beyond weights
    and Adam's state (the module docstring lists the candidates)."""
    b, s, h, _, tp = _sizes(cfg)
    mode, part = cfg.parallel.recompute, preflight.pipeline_layout(cfg).part(stage)
    # a flat gradient buffer (the distributed optimizer's, or main gradients) lives for the whole run: resident
    low = cfg.hardware.params == "low"
    grads = 0 if cfg.parallel.distributed_optimizer or low else per_rank * 4
    accumulated = grads if preflight.micro_batches(cfg) > 1 else 0
    one, head, in_flight = _stage_activations(cfg, mode, stage)
    kept, recomputed = in_flight * one, _recomputed_bytes(cfg, mode)
    vocab_part = padded_vocab_size(cfg.model.vocab_size, tp) / tp
    logits = b * s * vocab_part * _element(cfg) if part.head else 0
    first_grad = vocab_part * h * (2 if low else 4) if part.head and (grads or low) else 0
    forward_end = kept + logits + accumulated
    top_layer = kept + max(recomputed - head, 0) + (accumulated or first_grad)
    bottom_layer = kept - one + layer_activation_bytes(cfg, mode) + recomputed + grads
    return max(forward_end, top_layer, bottom_layer, grads)


def measure_step_peak_bytes(step: Callable[[], object], resident: Iterable[torch.Tensor]) -> int:
    """The most bytes live at once while `step()` runs on CPU: the `resident` tensors (weights, Adam's state)
    plus every storage the step allocates, tracked from its creation by an operator to its release. Views of
    resident storages (a weight's transpose, a parameter inside the distributed optimizer's buffer) are not new
    memory, and each storage counts once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in resident}
    tracker = _LiveStorages(set(storages))
    with tracker:
        step()
    return sum(storages.values()) + tracker.peak


class _LiveStorages(TorchDispatchMode):
    def __init__(self, resident: set[int]):
        super().__init__()
        self.sizes, self.resident, self.live, self.peak = {}, resident, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self.sizes or key in self.resident or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self.sizes.pop(key)


def measure_activation_bytes(model, tokens: torch.Tensor) -> int:
    """What autograd actually keeps for backward over one forward pass of `model` on `tokens` (distinct
    storages, parameters excluded): the measurement the estimate above is checked against."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()  # with recomputation, it happens here; its tensors are freed layer by layer
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in kept.items() if ptr not in parameters)


def estimate(cfg: Config) -> dict:
    stage_parameters, total = preflight.stage_parameter_counts(cfg)
    par, m = cfg.parallel, cfg.model
    seq = cfg.data.seq_len or m.seq_len
    vocab = padded_vocab_size(m.vocab_size, par.tp)
    # weights and optimizer state, and a flat gradient buffer (distributed optimizer, main gradients)
    low = cfg.hardware.params == "low"
    freed = 0 if par.distributed_optimizer or low else 4  # the plain optimizer's fp32 gradients, freed each step
    resident_bytes = preflight.state_bytes_per_parameter(cfg) - freed
    shards = par.dp if par.distributed_optimizer else 1  # Adam's moments (and main weights) split over DP
    peaks = [n * resident_bytes + step_peak_bytes(cfg, n, stage) for stage, n in enumerate(stage_parameters)]
    # the stage that needs the most: the first holds the most micro-batches in flight, the last the head
    stage = max(range(par.pp), key=peaks.__getitem__)
    per_rank, peak = stage_parameters[stage], peaks[stage]
    activations = {mode: activation_bytes(cfg, mode, stage=stage) for mode in RECOMPUTE_MODES}
    memory = cfg.hardware.memory_gb
    return {
        "parameters_total": total,
        "parameters_per_rank": per_rank,
        "weights_gb": per_rank * (2 if low else 4) / 1e9,
        "gradients_gb": per_rank * 4 / 1e9,  # fp32: the gradients, or the main gradients
        "optimizer_gb": per_rank * ((4 if low else 0) + 8) / shards / 1e9,  # main weights, Adam's moments
        "activations_gb": activations["none"] / 1e9,
        "activations_selective_gb": activations["selective"] / 1e9,
        "activations_full_gb": activations["full"] / 1e9,
        "total_gb": peak / 1e9,
        "device_memory_gb": memory,
        "fits": None if memory is None else peak / 1e9 <= memory,
        "largest_stage": stage,
        "pipeline_bubble": bubble_fraction(par.pp, par.virtual_stages, preflight.micro_batches(cfg)),
        "model_flops_per_iteration": model_flops(par.global_batch, seq, m.layers, m.hidden, vocab),
        "executed_flops_per_iteration": hardware_flops(par.global_batch, seq, m.layers, m.hidden, vocab, par.recompute),
    }


def report(cfg: Config, plan: dict) -> str:
    par = cfg.parallel
    stage = f", stage {plan['largest_stage']} (the largest)" if par.pp > 1 else ""
    fits = {None: "unknown (no device memory given)", True: "yes", False: "NO"}[plan["fits"]]
    sharded = f" / dp={par.dp}" if par.distributed_optimizer else ""  # the distributed optimizer
    low = cfg.hardware.params == "low"
    rows = [
        ("parameters (whole model)", f"{plan['parameters_total'] / 1e9:.3f}B"),
        ("parameters per rank", f"{plan['parameters_per_rank'] / 1e9:.3f}B"),
        (f"weights ({cfg.hardware.precision if low else 'fp32'})", f"{plan['weights_gb']:.2f} GB"),
        ("main gradients (fp32)" if low else "gradients (fp32)", f"{plan['gradients_gb']:.2f} GB"),
        (
            f"main weights + Adam state (3 x fp32{sharded})" if low else f"Adam state (2 x fp32{sharded})",
            f"{plan['optimizer_gb']:.2f} GB",
        ),
        (f"activations, micro batch {par.micro_batch}{stage}", f"{plan['activations_gb']:.2f} GB"),
        ("activations, recompute=selective", f"{plan['activations_selective_gb']:.2f} GB"),
        ("activations, recompute=full", f"{plan['activations_full_gb']:.2f} GB"),
        ("peak per rank (as configured)", f"{plan['total_gb']:.2f} GB"),
        (f"{cfg.hardware.name} memory per device", f"{plan['device_memory_gb'] or 0:.0f} GB"),
        ("fits", fits),
        ("model FLOPs per iteration", f"{plan['model_flops_per_iteration']:.3e}"),
    ]
    if par.pp > 1:
        bubble = f"{100 * plan['pipeline_bubble']:.1f}% of the compute time"
        rows.append((f"pipeline bubble ({par.schedule}, (p - 1) / (v m))", bubble))
    sequence_parallel = " (sequence parallel)" if par.sequence_parallel and par.tp > 1 else ""
    grid = f"tp={par.tp}{sequence_parallel} x pp={par.pp} x dp={par.dp}"
    title = f"{cfg.model.name} at {grid}, global batch {par.global_batch}, seq {cfg.data.seq_len}"
    width = max(len(k) for k, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def plan(composed: Config) -> dict:
    cfg = preflight.resolve(composed, measure_peak=False)
    cfg.model.validate(cfg.parallel.tp)
    preflight.check_pipeline(cfg)
    result = estimate(cfg)
    print(report(cfg, result))
    return result


@entry.hydra_app("plan")
def main(raw: DictConfig) -> None:
    entry.run_here(raw, Config, plan)


if __name__ == "__main__":
    main()
