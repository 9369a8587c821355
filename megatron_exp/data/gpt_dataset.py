"""GPT training samples: windows of seq_len + 1 tokens from a split's token stream, in a seeded order.

Sample k covers tokens [k*seq_len, k*seq_len + seq_len + 1): inputs are the first seq_len, targets the last
seq_len, and consecutive samples share one token so no target is skipped. Each epoch visits every sample once
in an order drawn from (seed, epoch), so position i of the whole run names the same sample on every rank and
after a restart: iteration t of a run with global batch G reads positions [t*G, (t+1)*G), and DP rank r of D
reads its contiguous share of them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from megatron_exp.config import ConfigError


class SampleOrder:
    """The endless sequence of sample indices: epoch after epoch, each a permutation drawn from (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle

    @lru_cache(maxsize=2)  # noqa: B019 - one order per split lives for the whole run
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def sample_index(self, position: int) -> int:
        """Which sample sits at `position`."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self._permutation(epoch)[offset]) if self.shuffle else offset


class GPTSamples:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True, split: str = "train"):
        self.tokens, self.seq_len = tokens, seq_len
        num_samples = (len(tokens) - 1) // seq_len
        if num_samples < 1:
            raise ConfigError(
                f"the {split} split has {len(tokens)} tokens, fewer than one sample of data.seq_len={seq_len} + 1: "
                "use a shorter data.seq_len or more data"
            )
        self.order = SampleOrder(num_samples, seed, shuffle)

    def __len__(self) -> int:
        return self.order.num_samples

    def sample_index(self, position: int) -> int:
        return self.order.sample_index(position)

    def batch(self, positions: range) -> torch.Tensor:
        """Samples at `positions` as int64 [len(positions), seq_len + 1]."""
        starts = [self.sample_index(p) * self.seq_len for p in positions]
        rows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def micro_batch(self, positions: range) -> tuple[dict, dict]:
        """(the model's inputs, the loss's targets) for the samples at `positions`."""
        tokens = self.batch(positions)
        return {"tokens": tokens[:, :-1]}, {"targets": tokens[:, 1:]}


def micro_batch_positions(
    iteration: int, micro_step: int, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int
) -> range:
    """Positions read by one DP rank's `micro_step`-th micro-batch of `iteration` (both 0-based)."""
    per_rank = global_batch // dp_size
    start = iteration * global_batch + dp_rank * per_rank + micro_step * micro_batch
    return range(start, start + micro_batch)
