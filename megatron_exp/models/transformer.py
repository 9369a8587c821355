"""A tensor-parallel transformer layer: attention heads and MLP columns split across TP ranks.

Per layer and TP group: forward has 2 all-reduces (g after attention, g after the MLP), backward 2 (f before
each). Layernorms, the residual stream and the row-parallel biases are replicated.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.parallel import random
from megatron_exp.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_exp.parallel.state import Group


def output_init_std(cfg: ModelConfig) -> float:
    """Std of the projections that write into the residual stream, scaled so its variance stays O(1) in depth."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)


class ParallelAttention(nn.Module):
    """Causal self-attention with this rank's heads.

    The fused QKV weight is laid out head by head ([q_0 k_0 v_0 q_1 k_1 v_1 ...] along its output rows), so
    splitting its rows into contiguous TP slices hands each rank whole heads.
    """

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.local_heads, self.head_dim = cfg.heads // tp.size, cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, init_std=cfg.init_std, tp=tp)
        self.proj = RowParallelLinear(cfg.hidden, cfg.hidden, init_std=output_init_std(cfg), tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, local_heads, seq, head_dim]
        dropout = self.dropout if self.training else 0.0
        with random.tp_region() if dropout > 0 else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim))


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> GELU (tanh form, as GPT-2) -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn_hidden, init_std=cfg.init_std, tp=tp)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden, cfg.hidden, init_std=output_init_std(cfg), tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + dropout(attention(ln(x))), then the same with the MLP."""

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attention = ParallelAttention(cfg, tp)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = ParallelMLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
