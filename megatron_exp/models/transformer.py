"""A tensor-parallel transformer: attention heads and MLP columns split across TP ranks, and the embeddings and
layer stack that GPT and BERT share.

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
from megatron_exp.parallel import random, state
from megatron_exp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_exp.parallel.sharding import init_normal_shard_
from megatron_exp.parallel.state import Group


def output_init_std(cfg: ModelConfig) -> float:
    """Std of the projections that write into the residual stream, scaled so its variance stays O(1) in depth."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)


class ParallelAttention(nn.Module):
    """Self-attention with this rank's heads: causal for GPT, bidirectional over the unpadded tokens for BERT.

    The fused QKV weight is laid out head by head ([q_0 k_0 v_0 q_1 k_1 v_1 ...] along its output rows), so
    splitting its rows into contiguous TP slices hands each rank whole heads.
    """

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.local_heads, self.head_dim = cfg.heads // tp.size, cfg.head_dim
        self.dropout, self.causal = cfg.attention_dropout, cfg.causal
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, init_std=cfg.init_std, tp=tp)
        self.proj = RowParallelLinear(cfg.hidden, cfg.hidden, init_std=output_init_std(cfg), tp=tp)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`padding_mask` [batch, seq], True at real tokens: no query attends to a padding key."""
        batch, seq, _ = x.shape
        qkv = self.qkv(x).view(batch, seq, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, local_heads, seq, head_dim]
        dropout = self.dropout if self.training else 0.0
        keys = None if padding_mask is None else padding_mask[:, None, None, :]
        with random.tp_region() if dropout > 0 else nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, keys, dropout_p=dropout, is_causal=self.causal)
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
    """Pre-LN (default): x + dropout(attention(ln(x))), then the same with the MLP.
    Post-LN (`model.layernorm=post`, the original BERT): ln(x + dropout(attention(x))), then the same."""

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        self.post_ln = cfg.layernorm == "post"
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attention = ParallelAttention(cfg, tp)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = ParallelMLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_ln:
            x = self.attention_norm(x + self.dropout(self.attention(x, padding_mask)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attention(self.attention_norm(x), padding_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerModel(nn.Module):
    """Word (vocab-parallel) + learned position [+ token type] embeddings, then the layer stack, normalized once:
    after the stack with pre-LN, on the embeddings with post-LN. GPT and BERT add their heads on top.

    Weights depend on `seed`, not on the TP degree. Built under `torch.device("meta")` it allocates nothing and
    skips initialization (for counting and planning). Subclasses add their modules, then call `finish_init`.
    """

    def __init__(self, cfg: ModelConfig, tp: Group | None, activation_checkpointing: bool, token_types: int = 0):
        super().__init__()
        self.tp = tp or state.current().tp
        cfg.validate(self.tp.size)
        self.cfg, self.activation_checkpointing = cfg, activation_checkpointing
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, init_std=cfg.init_std, tp=self.tp)
        self.position_embedding = nn.Parameter(torch.empty(cfg.seq_len, cfg.hidden))
        self.token_type_embedding = nn.Parameter(torch.empty(token_types, cfg.hidden)) if token_types else None
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, self.tp) for _ in range(cfg.layers))
        norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.final_norm, self.embedding_norm = (norm, None) if cfg.layernorm == "pre" else (None, norm)

    @property
    def device(self) -> torch.device:
        return self.position_embedding.device

    def compile_layers(self) -> None:
        """torch.compile each transformer layer in place (`train.compile`): parameter names, and so checkpoints,
        stay the same, and the embeddings and loss stay eager."""
        for layer in self.layers:
            layer.compile()

    def finish_init(self, seed: int) -> None:
        if not self.position_embedding.is_meta:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights (output projections scaled down), zero biases, unit layernorms.

        Parameters are drawn in module order from one generator as whole serial tensors, so every TP degree
        starts from the same model; replicated linear layers (heads) get the same draw on every rank.
        """
        generator = torch.Generator(device=self.position_embedding.device).manual_seed(seed)
        self.embedding.reset_parameters(generator)
        init_normal_shard_(self.position_embedding, self.tp, self.cfg.init_std, generator)
        if self.token_type_embedding is not None:
            init_normal_shard_(self.token_type_embedding, self.tp, self.cfg.init_std, generator)
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.reset_parameters(generator)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, self.cfg.init_std, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def encode(
        self, tokens: torch.Tensor, token_types: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [batch, seq] -> hidden states [batch, seq, hidden], replicated on every TP rank."""
        seq = tokens.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embedding(tokens) + self.position_embedding[:seq]
        if token_types is not None:
            x = x + F.embedding(token_types, self.token_type_embedding)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.embedding_dropout(x)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = random.checkpoint(layer, x, padding_mask)
            else:
                x = layer(x, padding_mask)
        return x if self.final_norm is None else self.final_norm(x)
