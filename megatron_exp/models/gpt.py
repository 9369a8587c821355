"""GPT-2 with tensor parallelism: vocab-parallel embedding tied to the output layer, parallel transformer layers.

The forward pass returns this rank's vocabulary slice of the logits; `loss` turns it into the mean token loss
with the vocab-parallel cross-entropy, so full-vocabulary logits are never gathered.
"""

from __future__ import annotations

import torch

from megatron_exp.config import ModelConfig
from megatron_exp.models.kv_cache import KVCache
from megatron_exp.models.transformer import TransformerModel
from megatron_exp.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_exp.parallel.mappings import f_linear
from megatron_exp.parallel.pipeline import ModelPart
from megatron_exp.parallel.state import Group


class GPTModel(TransformerModel):
    """Built on the current process grid's TP group (or `tp`); weights depend on `seed`, not on the TP degree."""

    perplexity_term = "loss"
    loss_term_names = ("loss",)

    def __init__(
        self,
        cfg: ModelConfig,
        tp: Group | None = None,
        *,
        recompute: str = "none",  # parallel.recompute: none | selective | full
        seed: int = 0,
        part: ModelPart | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, tp, recompute, part=part, sequence_parallel=sequence_parallel)
        self.finish_init(seed)

    def forward(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor | None = None,
        chunk: int | None = None,
        cache: KVCache | None = None,
    ):
        """tokens [batch, seq] -> this rank's logits [batch, seq, padded_vocab / tp]; in a pipeline, a chunk
        before the last returns its hidden states instead. With a `cache`, tokens follow the cached ones."""
        x = self.encode(tokens, hidden=hidden, chunk=chunk, cache=cache)
        return self.output_logits(x) if self.is_last(chunk) else x

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> this rank's vocabulary slice of the logits (the output layer tied to the
        embedding); generation applies it to the last position only. With sequence parallelism x is this rank's
        sequence shard, gathered inside the matmul: the logits cover the whole sequence."""
        return f_linear(x, self.embedding.weight, None, self.tp, self.sequence_parallel)

    def loss_terms(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mean token loss."""
        return {"loss": self.loss(logits, targets)}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Mean cross-entropy over tokens (over `loss_mask`'s ones when given), identical on every TP rank."""
        losses = self.token_losses(logits, targets)
        if loss_mask is None:
            return losses.mean()
        return (losses * loss_mask).sum() / loss_mask.sum()

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log p(target) per position, from this rank's vocabulary slice (the evaluations sum these)."""
        return vocab_parallel_cross_entropy(logits, targets, self.cfg.vocab_size, self.tp)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens over the real vocabulary (padding is never predicted)."""
        return vocab_parallel_argmax(logits, self.cfg.vocab_size, self.tp)
