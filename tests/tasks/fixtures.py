"""Models with known answers, for checking the evaluation arithmetic end to end."""

import torch
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.parallel.sharding import padded_vocab_size
from megatron_exp.parallel.state import Group


class NextTokenOracle(nn.Module):
    """Predicts (token + shift) mod vocab with certainty. The padding columns get the largest logits of all, so
    any evaluation that forgets to mask them gets a wrong answer."""

    def __init__(self, vocab_size: int, shift: int = 1):
        super().__init__()
        self.cfg, self.tp, self.shift = ModelConfig(vocab_size=vocab_size), Group(), shift
        self.embedding = nn.Embedding(1, 1)  # where evaluations look up the device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.cfg.vocab_size
        logits = torch.zeros(*tokens.shape, padded_vocab_size(vocab, 1))
        logits.scatter_(-1, ((tokens + self.shift) % vocab).unsqueeze(-1), 100.0)
        logits[..., vocab:] = 1000.0
        return logits
