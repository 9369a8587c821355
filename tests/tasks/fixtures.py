"""Models with known answers, for checking the evaluation arithmetic end to end, and a tiny GPT-2-vocabulary model
for checking batched scoring on the real test files."""

import contextlib

import torch
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from megatron_exp.parallel.sharding import padded_vocab_size
from megatron_exp.parallel.state import Group


class NextTokenOracle(nn.Module):
    """Predicts (token + shift) mod vocab with certainty. The padding columns get the largest logits of all, so
    any evaluation that forgets to mask them gets a wrong answer."""

    def __init__(self, vocab_size: int, shift: int = 1):
        super().__init__()
        self.cfg, self.tp, self.shift = ModelConfig(vocab_size=vocab_size), Group(), shift
        self.device = torch.device("cpu")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = self.cfg.vocab_size
        logits = torch.zeros(*tokens.shape, padded_vocab_size(vocab, 1))
        logits.scatter_(-1, ((tokens + self.shift) % vocab).unsqueeze(-1), 100.0)
        logits[..., vocab:] = 1000.0
        return logits

    def token_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.cfg.vocab_size, self.tp)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_argmax(logits, self.cfg.vocab_size, self.tp)


@contextlib.contextmanager
def single_threaded():
    """One intra-op thread: multi-threaded CPU matmuls may split the inner dimension for small inputs only, which
    would make a token's logits depend on how many sequences share the forward (in the last bit). One thread keeps
    the model's kernels batch-invariant, so a comparison of batch sizes tests the harness alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
