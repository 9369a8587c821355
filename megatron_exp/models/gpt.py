"""GPT-2 with tensor parallelism: vocab-parallel embedding tied to the output layer, parallel transformer layers.

The forward pass returns this rank's vocabulary slice of the logits; `loss` turns it into the mean token loss
with the vocab-parallel cross-entropy, so full-vocabulary logits are never gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.models.transformer import TransformerLayer
from megatron_exp.parallel import random, state
from megatron_exp.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_exp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_exp.parallel.mappings import f
from megatron_exp.parallel.sharding import init_normal_shard_
from megatron_exp.parallel.state import Group


class GPTModel(nn.Module):
    """Built on the current process grid's TP group (or `tp`); weights depend on `seed`, not on the TP degree.

    Built under `torch.device("meta")` it allocates nothing and skips initialization (for counting and planning).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp: Group | None = None,
        *,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.tp = tp or state.current().tp
        cfg.validate(self.tp.size)
        self.cfg, self.activation_checkpointing = cfg, activation_checkpointing
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden, init_std=cfg.init_std, tp=self.tp)
        self.position_embedding = nn.Parameter(torch.empty(cfg.seq_len, cfg.hidden))
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, self.tp) for _ in range(cfg.layers))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        if not self.position_embedding.is_meta:
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights (output projections scaled down), zero biases, unit layernorms.

        Parameters are drawn in module order from one generator as whole serial tensors, so every TP degree
        starts from the same model.
        """
        generator = torch.Generator(device=self.position_embedding.device).manual_seed(seed)
        self.embedding.reset_parameters(generator)
        init_normal_shard_(self.position_embedding, self.tp, self.cfg.init_std, generator)
        for module in self.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.reset_parameters(generator)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] -> this rank's logits [batch, seq, padded_vocab / tp]."""
        seq = tokens.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"sequence of {seq} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.embedding_dropout(self.embedding(tokens) + self.position_embedding[:seq])
        for layer in self.layers:
            x = random.checkpoint(layer, x) if self.activation_checkpointing and self.training else layer(x)
        x = self.final_norm(x)
        return F.linear(f(x, self.tp), self.embedding.weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Mean cross-entropy over tokens (over `loss_mask`'s ones when given), identical on every TP rank."""
        losses = vocab_parallel_cross_entropy(logits, targets, self.cfg.vocab_size, self.tp)
        if loss_mask is None:
            return losses.mean()
        return (losses * loss_mask).sum() / loss_mask.sum()
