"""The keys and values of the tokens decoded so far, so that generation feeds one new token per step instead of
the whole sequence again.

Each TP rank caches its own heads only (the attention's slice of the fused QKV), so the cache is split like the
weights and no rank holds another's. The cache's slots are the batch's columns in the order they were fed; a slot
may hold padding (prompts of different lengths, padded on either side): no real token attends to a padding slot,
and positions count the real tokens only, so every row decodes exactly as it would alone.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    """`capacity` slots per row for every attention layer that uses it, allocated on a layer's first write."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.capacity = capacity
        self.real = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # slots holding a real token
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens fed so far, per row
        self.start = self.length = 0  # the block being fed covers slots [start, length)
        self.positions = self.mask = None
        # per attention module: its keys and values [batch, local heads, capacity, head dim]
        self.layers: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, real: torch.Tensor) -> None:
        """Open the next block of slots for a forward of `real.shape[1]` tokens per row; `real` [batch, n] marks
        which are real tokens (not padding). Sets the block's `positions` and attention `mask`."""
        n = real.shape[1]
        if self.length + n > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} slots; {self.length} are used, {n} more asked for")
        self.start, self.length = self.length, self.length + n
        self.real[:, self.start : self.length] = real
        self.positions = (self.seen[:, None] + real.cumsum(-1) - 1).clamp(min=0)  # padding: any valid position
        self.seen += real.sum(-1)
        slots = torch.arange(self.length, device=real.device)
        queries = slots[self.start :, None]
        visible = (slots <= queries) & self.real[:, None, : self.length]  # causal, real keys only
        # A padding query sees itself, so that no row of scores is all -inf (NaN in SDPA, and then in the cache).
        self.mask = (visible | (slots == queries)).unsqueeze(1)  # [batch, 1, n, length]

    def update(self, layer: nn.Module, keys: torch.Tensor, values: torch.Tensor):
        """Store the block's keys and values [batch, local heads, n, head dim] of `layer`; returns its keys and
        values of every slot so far and the block's attention mask."""
        if layer not in self.layers:
            batch, heads, _, dim = keys.shape
            shape = (batch, heads, self.capacity, dim)
            self.layers[layer] = keys.new_empty(shape), values.new_empty(shape)
        cached_keys, cached_values = self.layers[layer]
        cached_keys[:, :, self.start : self.length] = keys
        cached_values[:, :, self.start : self.length] = values
        return cached_keys[:, :, : self.length], cached_values[:, :, : self.length], self.mask
