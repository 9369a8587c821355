"""FLOPs of one training iteration of a GPT or BERT, for throughput, MFU and HFU.

Model FLOPs (Korthikanti et al. 2022, eq. 7; no recomputation counted):
    72 B s L h^2 (1 + s/(6h) + V/(12 L h))
The FLOPs the hardware executes (`hardware_flops`) add what `parallel.recompute` runs again in backward:
    none:      the model FLOPs
    selective: + 4 B s^2 h per layer, the attention core's forward once more (QK^T and attention over V,
               2 B s^2 h each; the softmax and dropout are not counted)
    full:      96 B s L h^2 (1 + s/(6h) + V/(16 L h)), each layer's forward once more (Narayanan et al. 2021,
               eq. 3)
B sequences of s tokens, L layers, hidden h, (padded) vocabulary V. Attention convention: the full s x s score
matrix is counted (not halved for GPT's causal mask), as in both papers. BERT uses the same count: its MLM logits
are computed at every position, as GPT's; the small MLM dense layer, pooler and SOP head (< 1/L of a layer) are
left out. RACE fine-tuning has no vocabulary layer (V = 0).

MFU = model FLOPs per second / peak of the devices used; HFU uses the executed FLOPs.
"""

from __future__ import annotations

ATTENTION_CONVENTION = "full s^2 attention (a causal mask is not halved)"


def model_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    b, s, l, h, v = batch, seq, layers, hidden, vocab
    return 72 * b * s * l * h**2 * (1 + s / (6 * h) + v / (12 * l * h))


def hardware_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int, recompute: str) -> float:
    """The model FLOPs plus what `recompute` (none | selective | full) runs again, as in the module docstring."""
    b, s, l, h, v = batch, seq, layers, hidden, vocab
    if recompute == "full":
        return 96 * b * s * l * h**2 * (1 + s / (6 * h) + v / (16 * l * h))
    extra = 4 * b * s**2 * h * l if recompute == "selective" else 0
    return model_flops(b, s, l, h, v) + extra


def utilization(flops_per_iteration: float, seconds_per_iteration: float, devices: int, peak_tflops: float) -> float:
    """Fraction of the devices' peak that `flops_per_iteration` in `seconds_per_iteration` represents."""
    return flops_per_iteration / seconds_per_iteration / devices / (peak_tflops * 1e12)
