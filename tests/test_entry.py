"""The entry-point shell: bad input is one line and exit 2 before any worker starts; runs never share a directory."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_exp.entry import unique_dir
from tests.test_train import ROOT, TINY, records


def _run(*args: str, cwd: Path, module: str = "megatron_exp.train", timeout: int = 120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _errors(done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+parallel.tpp=2"], "parallel.tpp is not a config key (a typo? '+' cannot add keys to a typed section)"),
        pytest.param(["parallel.tpp=2"], "parallel.tpp is not a config key", marks=pytest.mark.slow),
        pytest.param(["model=gpt_9b"], "Could not find 'model/gpt_9b' (available: bert_1b,", marks=pytest.mark.slow),
        pytest.param(
            ["parallel.tp=two"], "Value 'two' of type 'str' could not be converted to Integer", marks=pytest.mark.slow
        ),
        (["parallel.tp=0"], "parallel.tp=0 must be a positive integer"),
        pytest.param(["parallel.dp=0"], "parallel.dp=0 must be a positive integer", marks=pytest.mark.slow),
        pytest.param(["optimizer.min_lr=-1e-5"], "optimizer.min_lr=-1e-05 must be >= 0", marks=pytest.mark.slow),
        pytest.param(["optimizer.lr=-1"], "optimizer.lr=-1.0 must be > 0", marks=pytest.mark.slow),
        pytest.param(
            ["parallel.timeout_s=0"], "parallel.timeout_s=0 must be a positive integer", marks=pytest.mark.slow
        ),
        (
            ["parallel.activation_checkpointing=true"],
            "parallel.activation_checkpointing was renamed parallel.recompute: set parallel.recompute=<value> instead",
        ),
        pytest.param(
            ["parallel.recompute=some"],
            "parallel.recompute=some is unknown: use none, selective or full",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_worker(tmp_path, overrides, message):
    done = _run(*overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = _errors(done)
    assert len(errors) == 1 and message in errors[0], done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and not (tmp_path / "run" / "logs").exists()


def test_the_planner_refuses_a_zero_degree_in_one_line(tmp_path):
    done = _run("parallel.tp=0", cwd=tmp_path, module="megatron_exp.plan")
    errors = _errors(done)
    assert done.returncode == 2 and len(errors) == 1, done.stdout + done.stderr
    assert "parallel.tp=0 must be a positive integer" in errors[0]


def test_a_run_directory_is_claimed_atomically(tmp_path):
    first, second = unique_dir(str(tmp_path / "a")), unique_dir(str(tmp_path / "b"))
    assert (first, second) == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert unique_dir(str(tmp_path / "a")) == first  # the same answer each time this process asks
    (tmp_path / "c").mkdir()  # another run holds it
    assert unique_dir(str(tmp_path / "c")) == str(tmp_path / "c-2")


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_directories_metrics_and_wandb_ids(tmp_path):
    quick = ["model=gpt_tiny", "data.seq_len=32", "parallel.micro_batch=2", "train.iterations=2", "train.eval_iters=1",
             "train.test_iters=1", "train.log_interval=1",
             f"data.cache_dir={tmp_path / 'cache'}", "logger.mode=offline"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "megatron_exp.train", *quick]
    jobs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]  # fmt: skip
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*_gpt_tiny_tp1*") if p.is_dir())
    assert len(runs) == 2, runs
    ids = {(run / "wandb_id").read_text() for run in runs}
    assert len(ids) == 2
    for run in runs:  # each run's metrics are its own: iterations 1 and 2 once, and one checkpoint
        iterations = [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert sorted(set(iterations)) == [1, 2] and iterations.count(1) == 1
        assert (run / "checkpoints" / "latest").read_text() == "iter_0000002"


@pytest.mark.slow
def test_wandb_that_cannot_reach_its_server_does_not_stall_a_tp2_job(tmp_path, shared_cache):
    """A server that accepts connections and never answers: W&B gives up after logger.init_timeout_s, in the
    background, and no rank hits its short parallel.timeout_s waiting for rank 0."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    threading.Thread(target=lambda: held.extend(iter(server.accept, None)), daemon=True).start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
           "WANDB_API_KEY": "x" * 40}  # fmt: skip
    overrides = [*TINY, "parallel.tp=2", "train.iterations=4", "logger.mode=online", "logger.init_timeout_s=8",
                 "parallel.timeout_s=5", f"data.cache_dir={shared_cache}"]  # fmt: skip
    overrides.append(f"hydra.run.dir={tmp_path / 'run'}")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "megatron_exp.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "W&B could not start" in output or "W&B did not start within" in output
    assert [r["iteration"] for r in records(tmp_path / "run") if "train/loss" in r] == [1, 2, 3, 4]
    assert time.monotonic() - start < 120
