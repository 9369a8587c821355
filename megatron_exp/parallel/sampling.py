"""The next token from logits whose vocabulary is split across TP ranks, without gathering the logits.

Greedy (temperature 0) is the global argmax over the real vocabulary. Sampling uses the Gumbel-max trick: the
argmax of logits / temperature plus Gumbel noise is an exact draw from their softmax. Every rank draws the same
noise for the whole real vocabulary (a generator seeded alike, a [batch, vocab] draw: cheap next to a forward)
and adds its own slice, so all ranks pick the same token, and the draw does not depend on the TP degree or the
padding. Top-k and top-p only need a threshold per row, which a few of each shard's largest logits give:

- top-k: the k-th largest of every shard's top k, gathered (the global top k is among them);
- top-p (the smallest set of largest-probability tokens whose mass reaches p, ties at its edge kept): the
  shards' top m gathered, the softmax normalizer all-reduced; once the candidates' mass reaches p at an edge not
  below the largest logit left out of the gather, that edge is exact, else m doubles (after top-k, or for a
  peaked distribution, the first round suffices).

Filtered and padding tokens are set to -inf and are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_exp.parallel.cross_entropy import masked_logits, vocab_parallel_argmax
from megatron_exp.parallel.mappings import all_reduce_, gather_last_dim
from megatron_exp.parallel.state import Group

NUCLEUS_CANDIDATES = 64  # per shard, in top-p's first round without top-k


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (top_k, top_p and seed then play no part)."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest most likely set of mass >= top_p; 1: all
    seed: int = 0


GREEDY = Sampling()


class Sampler:
    """Chooses one token per row from this rank's vocabulary slice of the logits; the same on every TP rank.
    Successive calls continue one random stream, so a generation is reproducible from its seed."""

    def __init__(self, sampling: Sampling, vocab_size: int, tp: Group, device: torch.device):
        self.sampling, self.vocab_size, self.tp = sampling, vocab_size, tp
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, padded_vocab / tp] -> token ids [batch]."""
        s = self.sampling
        if s.temperature == 0:
            return vocab_parallel_argmax(logits, self.vocab_size, self.tp)
        x, start = masked_logits(logits, self.vocab_size, self.tp)
        x /= s.temperature
        if 0 < s.top_k < self.vocab_size:
            x.masked_fill_(x < self._kth_largest(x, s.top_k), float("-inf"))
        if s.top_p < 1.0:
            x.masked_fill_(x < self._nucleus_edge(x, s.top_p, s.top_k or NUCLEUS_CANDIDATES), float("-inf"))
        return vocab_parallel_argmax(x + self._gumbel_noise(x, start), self.vocab_size, self.tp)

    def _kth_largest(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[batch, 1]: the k-th largest logit over all shards."""
        local = x.topk(min(k, x.shape[-1]), dim=-1).values
        return gather_last_dim(local, self.tp).topk(k, dim=-1).values[:, -1:]

    def _nucleus_edge(self, x: torch.Tensor, p: float, count: int) -> torch.Tensor:
        """[batch, 1]: the smallest logit of the nucleus, the largest value v with mass(logits >= v) >= p."""
        part = x.shape[-1]
        row_max = all_reduce_(x.amax(dim=-1), self.tp, dist.ReduceOp.MAX)[:, None]
        total = all_reduce_((x - row_max).exp().sum(dim=-1), self.tp)[:, None]
        count = min(count, part)
        while True:
            top = x.topk(min(count + 1, part), dim=-1).values
            candidates = gather_last_dim(top[:, :count], self.tp).sort(dim=-1, descending=True).values
            # Every logit above the largest one left out is among the candidates.
            left_out = top[:, count] if count < part else torch.full_like(top[:, 0], float("-inf"))
            left_out = all_reduce_(left_out.contiguous(), self.tp, dist.ReduceOp.MAX)
            mass = ((candidates - row_max).exp() / total).cumsum(dim=-1)
            first = (mass < p).sum(dim=-1, keepdim=True).clamp(max=candidates.shape[-1] - 1)
            edge = candidates.gather(-1, first)
            # Exact where the candidates reach p and none left out lies above the edge; the same on every rank.
            if count == part or bool(((mass[:, -1] >= p) & (edge[:, 0] >= left_out)).all()):
                return edge
            count = min(2 * count, part)

    def _gumbel_noise(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """This rank's slice of the Gumbel noise drawn for the whole real vocabulary (0 on padding columns)."""
        uniform = torch.rand(x.shape[0], self.vocab_size, generator=self.generator, device=x.device, dtype=x.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(x.dtype).tiny)))
        noise = torch.zeros_like(x)
        real = gumbel[:, start : start + x.shape[-1]]
        noise[:, : real.shape[-1]] = real
        return noise
