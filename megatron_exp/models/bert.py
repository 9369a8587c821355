"""BERT with tensor parallelism: the shared transformer run bidirectionally over the unpadded tokens, with
token-type embeddings, a masked-LM head whose output layer is the vocab-parallel embedding (plus its own
vocab-parallel bias), and a sentence-order head on the pooled [CLS] state.

Only the MLM output layer touches the vocabulary, through f and the vocab-parallel cross-entropy; the MLM dense
layer, the pooler and the SOP head are small and replicated on every TP rank. With sequence parallelism the MLM
dense layer and its layernorm run on the sequence shard (their gradients tagged for the TP sum), the output layer
gathers the sequence, and the pooler reads [CLS] gathered from the first shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.models.transformer import TransformerModel
from megatron_exp.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_exp.parallel.mappings import f_linear, gather_sequence
from megatron_exp.parallel.pipeline import ModelPart
from megatron_exp.parallel.sharding import ShardSpec, mark_sequence_parallel
from megatron_exp.parallel.state import Group

TOKEN_TYPES = 2  # segment A and segment B


class BERTModel(TransformerModel):
    """Built on the current process grid's TP group (or `tp`). Without `pretraining_heads` (fine-tuning) it has
    the encoder and pooler only."""

    perplexity_term = "mlm_loss"  # the perplexity of the masked tokens
    loss_term_names = ("loss", "mlm_loss", "sop_loss", "sop_accuracy")

    def __init__(
        self,
        cfg: ModelConfig,
        tp: Group | None = None,
        *,
        recompute: str = "none",  # parallel.recompute: none | selective | full
        seed: int = 0,
        pretraining_heads: bool = True,
        part: ModelPart | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__(cfg, tp, recompute, token_types=TOKEN_TYPES, part=part, sequence_parallel=sequence_parallel)
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden) if self.part.head else None
        if pretraining_heads and self.part.head:
            self.mlm_dense = nn.Linear(cfg.hidden, cfg.hidden)
            self.mlm_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
            rows = self.embedding.weight.shape[0]
            self.mlm_bias = ShardSpec(dim=0, vocab_size=cfg.vocab_size).tag(nn.Parameter(torch.empty(rows)))
            self.sop_head = nn.Linear(cfg.hidden, 2)
            self.head_dropout = nn.Dropout(cfg.hidden_dropout)
        self.finish_init(seed)

    def mark_sequence_parallel(self) -> None:
        super().mark_sequence_parallel()  # mlm_norm among the layernorms
        if hasattr(self, "mlm_dense"):
            for param in self.mlm_dense.parameters():
                mark_sequence_parallel(param)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        super().init_weights(seed)
        if hasattr(self, "mlm_bias"):
            nn.init.zeros_(self.mlm_bias)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The sequence summary for classification: tanh(dense(state of [CLS])), [batch, hidden]. Under sequence
        parallelism every rank's first position is gathered and [CLS] is TP rank 0's."""
        first = gather_sequence(hidden[:, :1], self.tp)[:, 0] if self.sequence_parallel else hidden[:, 0]
        return torch.tanh(self.pooler(first))

    def forward(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor,
        padding_mask: torch.Tensor,
        hidden: torch.Tensor | None = None,
        chunk: int | None = None,
    ):
        """-> (this rank's MLM logits [batch, seq, padded_vocab / tp], SOP logits [batch, 2]); in a pipeline, a
        chunk before the last returns its hidden states instead."""
        hidden = self.encode(tokens, token_types, padding_mask, hidden=hidden, chunk=chunk)
        if not self.is_last(chunk):
            return hidden
        x = self.mlm_norm(F.gelu(self.mlm_dense(hidden), approximate="tanh"))
        mlm_logits = f_linear(x, self.embedding.weight, self.mlm_bias, self.tp, self.sequence_parallel)
        sop_logits = self.sop_head(self.head_dropout(self.pool(hidden)))
        return mlm_logits, sop_logits

    def loss_terms(
        self, outputs, mlm_targets: torch.Tensor, mlm_mask: torch.Tensor, sop_labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """MLM loss (mean over the masked positions), SOP loss and SOP accuracy, identical on every TP rank."""
        mlm_logits, sop_logits = outputs
        losses = vocab_parallel_cross_entropy(mlm_logits, mlm_targets, self.cfg.vocab_size, self.tp)
        mlm = (losses * mlm_mask).sum() / mlm_mask.sum().clamp(min=1)
        sop = F.cross_entropy(sop_logits.float(), sop_labels)
        accuracy = (sop_logits.argmax(-1) == sop_labels).float().mean()
        return {"loss": mlm + sop, "mlm_loss": mlm, "sop_loss": sop, "sop_accuracy": accuracy}

    def loss(self, outputs, mlm_targets, mlm_mask, sop_labels) -> torch.Tensor:
        """MLM + SOP loss, what pretraining minimizes."""
        return self.loss_terms(outputs, mlm_targets, mlm_mask, sop_labels)["loss"]


class BERTMultipleChoice(nn.Module):
    """Fine-tuning for multiple choice (RACE): each option's sequence is encoded, its pooled [CLS] state goes
    through dropout and a linear layer to one score, and the options of a question compete in a softmax."""

    perplexity_term = None
    loss_term_names = ("loss", "accuracy")

    def __init__(
        self,
        cfg: ModelConfig,
        tp: Group | None = None,
        *,
        recompute: str = "none",
        seed: int = 0,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.bert = BERTModel(
            cfg, tp, recompute=recompute, seed=seed, pretraining_heads=False, sequence_parallel=sequence_parallel
        )
        self.cfg, self.tp = cfg, self.bert.tp
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.score = nn.Linear(cfg.hidden, 1)
        if not self.score.weight.is_meta:
            generator = torch.Generator(device=self.score.weight.device).manual_seed(seed + 1)
            with torch.no_grad():
                self.score.weight.normal_(0.0, cfg.init_std, generator=generator)
                self.score.bias.zero_()

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Inputs [questions, options, seq] -> scores [questions, options]."""
        questions, options, seq = tokens.shape
        flat = (t.reshape(questions * options, seq) for t in (tokens, token_types, padding_mask))
        pooled = self.bert.pool(self.bert.encode(*flat))
        return self.score(self.dropout(pooled)).view(questions, options)

    @property
    def device(self) -> torch.device:
        return self.bert.device

    @property
    def dtype(self) -> torch.dtype:
        return self.bert.dtype

    def loss_terms(self, scores: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the softmax over each question's options, and the share answered right."""
        loss = F.cross_entropy(scores.float(), answers)
        return {"loss": loss, "accuracy": (scores.argmax(-1) == answers).float().mean()}
