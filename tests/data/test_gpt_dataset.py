import numpy as np
import pytest
import torch

from megatron_exp.config import ConfigError
from megatron_exp.data.gpt_dataset import GPTSamples, micro_batch_positions

TOKENS = np.arange(1001, dtype=np.uint16)  # token i has value i: positions are visible in the samples


def test_samples_are_contiguous_windows_sharing_one_token():
    data = GPTSamples(TOKENS, seq_len=10, seed=0, shuffle=False)
    assert len(data) == 100
    batch = data.batch(range(3))
    assert batch.dtype == torch.int64 and batch.shape == (3, 11)
    assert batch[0].tolist() == list(range(11))
    assert batch[1, 0] == batch[0, -1] == 10  # the last target of one sample is the first input of the next
    inputs, targets = batch[:, :-1], batch[:, 1:]
    assert torch.equal(targets, inputs + 1)


def test_every_epoch_visits_every_sample_once_in_a_seeded_order():
    data = GPTSamples(TOKENS, seq_len=10, seed=3)
    epoch0 = [data.sample_index(p) for p in range(100)]
    epoch1 = [data.sample_index(p) for p in range(100, 200)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))
    assert epoch0 != epoch1 and epoch0 != list(range(100))
    again = GPTSamples(TOKENS, seq_len=10, seed=3)
    assert [again.sample_index(p) for p in range(200)] == epoch0 + epoch1
    assert [GPTSamples(TOKENS, 10, seed=4).sample_index(p) for p in range(100)] != epoch0


def test_dp_ranks_and_micro_batches_partition_each_global_batch():
    global_batch, micro, dp = 12, 2, 3
    for iteration in (0, 5):
        seen = [
            p
            for rank in range(dp)
            for step in range(global_batch // (micro * dp))
            for p in micro_batch_positions(iteration, step, global_batch, micro, dp, rank)
        ]
        assert sorted(seen) == list(range(iteration * global_batch, (iteration + 1) * global_batch))
    # dp=1 with accumulation reads the same positions as dp=2 without, in the same order
    single = [p for s in range(2) for p in micro_batch_positions(4, s, 8, 4, 1, 0)]
    split = [p for r in range(2) for p in micro_batch_positions(4, 0, 8, 4, 2, r)]
    assert single == split


def test_a_split_shorter_than_one_sample_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"the valid split has 50 tokens, fewer than one sample of data.seq_len=64"):
        GPTSamples(TOKENS[:50], seq_len=64, seed=0, split="valid")
