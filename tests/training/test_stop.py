"""A signal stops every rank at one step boundary: one line, exit 128 + signal, the checkpoints intact, and with
checkpoint.on_signal a checkpoint of that very iteration that resumes bitwise."""

import json
import os
import signal

import pytest

from megatron_exp.training import checkpoint
from tests.test_train import TINY, _start, _wait_for, records, train

RUN = [*TINY, "parallel.tp=2", "train.eval_interval=0", "logger.wandb=false", "train.iterations=30"]


def _stop(job, signum: int, run_dir, after: int) -> str:
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(records(run_dir)) >= after, 240, "training")
    os.killpg(job.pid, signum)  # as Ctrl-C does: the launching process and every worker
    output, _ = job.communicate(timeout=120)
    return output


def test_ctrl_c_stops_every_worker_with_one_line_and_exit_130(tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    job = _start(run_dir, *RUN, "train.iterations=100000", "checkpoint.interval=2", cache=shared_cache)
    output = _stop(job, signal.SIGINT, run_dir, after=3)
    assert job.returncode == 130, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "interrupted at iteration" in line]
    assert len(lines) == 1 and f"(SIGINT); continue with resume={run_dir}" in lines[0], output
    latest = checkpoint.resolve(run_dir)  # the newest complete checkpoint loads on both ranks
    assert all(checkpoint.load_rank(latest, rank)["iteration"] == int(latest.name[5:]) for rank in (0, 1))


@pytest.mark.slow
def test_sigterm_with_on_signal_saves_the_current_iteration_and_resumes_bitwise(tmp_path, shared_cache):
    done = train(tmp_path / "whole", *RUN, cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {r["iteration"]: r["train/loss"] for r in records(tmp_path / "whole") if "train/loss" in r}

    run_dir = tmp_path / "preempted"
    overrides = [*RUN, "checkpoint.interval=0", "checkpoint.on_signal=true"]
    job = _start(run_dir, *overrides, cache=shared_cache)
    output = _stop(job, signal.SIGTERM, run_dir, after=3)
    assert job.returncode == 143, output
    stopped = json.loads((run_dir / "interrupted.json").read_text())
    assert stopped["signal"] == "SIGTERM" and stopped["iteration"] < 30, output
    assert checkpoint.read_meta(checkpoint.resolve(run_dir))["iteration"] == stopped["iteration"]

    resumed = train(run_dir, *overrides, f"resume={run_dir}", cache=shared_cache)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    losses = [(r["iteration"], r["train/loss"]) for r in records(run_dir) if "train/loss" in r]
    assert [i for i, _ in losses] == list(range(1, 31))  # each iteration once
    assert dict(losses) == expected
