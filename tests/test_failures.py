"""When spawned workers fail, the report names the rank whose own error started it, not a bystander."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_exp import launch
from megatron_exp.config import Config, HardwareConfig, ParallelConfig, RunSpec


def _work(spec, grid):
    """Every rank enters an all-reduce; rank 1 raises first (`raise`), or rank 2 never arrives (`freeze`)."""
    mode = spec.inputs["mode"]
    if mode == "raise" and grid.rank == 1:
        time.sleep(0.5)  # the others are waiting in the all-reduce by now
        raise FileNotFoundError("/data/shard_1.bin is missing")
    if mode == "freeze" and grid.rank == 2:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))
    return {}


def _spec(tmp_path, mode: str) -> RunSpec:
    cfg = Config(
        hardware=HardwareConfig(name="cpu", device="cpu", backend="gloo", precision="fp32"),
        parallel=ParallelConfig(tp=1, dp=3, timeout_s=3),
    )
    return RunSpec(cfg, str(tmp_path), workers=3, inputs={"mode": mode})


def test_the_rank_that_raised_is_named_not_the_peers_that_lost_it(tmp_path):
    with pytest.raises(launch.WorkerFailed) as failure:
        launch.run(_spec(tmp_path, "raise"), _work)
    message = str(failure.value)
    assert message.startswith("worker rank 1 failed: FileNotFoundError: /data/shard_1.bin is missing"), message
    assert "lost it as a peer" in message and "(logs: " in message and "\n" not in message


@pytest.mark.slow
def test_a_frozen_rank_is_named_as_the_one_that_stopped_answering(tmp_path):
    start = time.monotonic()
    with pytest.raises(launch.WorkerFailed) as failure:
        launch.run(_spec(tmp_path, "freeze"), _work)
    assert "rank 2 stopped answering" in str(failure.value), str(failure.value)
    assert time.monotonic() - start < 50  # the frozen rank was stopped, not waited for
