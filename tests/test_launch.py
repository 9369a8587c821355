"""Faults in a spawned job: one worker killed with SIGKILL ends the whole job, quickly and cleanly."""

import os
import re
import signal
import time
from pathlib import Path

from tests.test_train import TINY, _start, _wait_for, records


def _descendants(pid: int) -> set[int]:
    children = {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    return children.union(*(_descendants(c) for c in children)) if children else set()


def _worker_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} from the line each worker prints first into its log."""
    pids = {}
    for log in run_dir.glob("logs/*/attempt_0/*/stdout.log"):
        match = re.search(r"\[rank (\d+)\] pid (\d+) on ", log.read_text())
        if match:
            pids[int(match[1])] = int(match[2])
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return ") Z " not in stat  # a zombie has exited


def test_killing_one_worker_ends_every_process_and_names_the_rank(tmp_path, shared_cache):
    overrides = [*TINY, "parallel.tp=2", "parallel.dp=2", "train.iterations=100000", "logger.wandb=false"]
    job = _start(tmp_path, *overrides, cache=shared_cache)
    try:
        _wait_for(lambda: (tmp_path / "metrics.jsonl").is_file() and records(tmp_path), 240, "training to start")
        workers = _worker_pids(tmp_path)
        assert sorted(workers) == [0, 1, 2, 3] and set(workers.values()) <= _descendants(job.pid)
        everything = _descendants(job.pid) | {job.pid}
        os.kill(workers[2], signal.SIGKILL)
        start = time.monotonic()
        output, _ = job.communicate(timeout=120)
        assert time.monotonic() - start < 120
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 1
    assert "error: worker rank 2 failed" in output and "SIGKILL" in output
    time.sleep(1)
    assert not [pid for pid in everything if _alive(pid)], "orphan processes remain"
