"""End to end: `python -m megatron_exp.train` as a user runs it, in a subprocess, on a tiny model."""

import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOCK = r"\d\d:\d\d:\d\d"
TINY = [
    "model=gpt_tiny",
    "model.hidden_dropout=0",
    "model.attention_dropout=0",  # attention dropout masks are per TP rank: off, so TP=1 and TP=2 are comparable
    "data.seq_len=64",
    "parallel.micro_batch=4",
    "train.iterations=40",
    "train.log_interval=1",
    "train.eval_interval=20",
    "train.eval_iters=4",
    "train.test_iters=2",
]


def train(run_dir: Path, *overrides: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "megatron_exp.train", *overrides, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_end_to_end_at_tp1_and_tp2(tmp_path, shared_cache):
    losses = {}
    for tp in (1, 2):
        run_dir = tmp_path / f"tp{tp}"
        done = train(run_dir, *TINY, f"parallel.tp={tp}", cache=shared_cache)
        assert done.returncode == 0, done.stdout + done.stderr
        output = done.stdout + done.stderr
        assert "MFU" in output and "ppl" in output and "valid loss" in output
        assert (
            "sample (temperature 0.7, top-k 40, top-p 0.9, seed 1234): 'In the beginning" in output
        )  # through the generation code, after training

        _assert_clean_console(done, run_dir, iterations=40)
        assert f"tp: {tp}" in (run_dir / "config.yaml").read_text()  # the resolved config
        assert sorted(p.name for p in (run_dir / "logs").rglob("stdout.log"))  # every rank's output kept
        offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))  # one W&B run per job

        metrics = records(run_dir)
        train_records = [r for r in metrics if "train/loss" in r]
        assert [r["iteration"] for r in train_records] == list(range(1, 41))
        assert all(0 < r["perf/mfu"] < 1 and r["perf/tokens_per_s"] > 0 for r in train_records)
        final = json.loads((run_dir / "results.json").read_text())
        assert final["test/loss"] > 0 and final["valid/ppl"] == pytest.approx(2.718281828 ** final["valid/loss"])
        assert final["valid/loss"] < train_records[0]["train/loss"] - 1.0, "validation loss must fall clearly"
        losses[tp] = [r["train/loss"] for r in train_records]

    for step, (serial, parallel) in enumerate(zip(losses[1][:5], losses[2][:5], strict=True), start=1):
        assert parallel == pytest.approx(serial, rel=1e-5, abs=1e-5), f"TP=2 differs from TP=1 at step {step}"


def _assert_clean_console(done: subprocess.CompletedProcess, run_dir: Path, iterations: int) -> None:
    """One prefix per line (a time, and a rank only on other ranks' lines), no carriage returns, every training line
    with its elapsed time and ETA, a last line pointing at the results and the W&B run, and train.log holding rank
    0's lines as the console shows them."""
    lines = (done.stdout + done.stderr).splitlines()
    doubled = [line for line in lines if re.match(rf"(\[rank \d+\] )?{CLOCK} (\[rank|{CLOCK})", line)]
    assert not doubled and "[default_role" not in done.stdout + done.stderr and "\r" not in done.stdout, doubled
    logged = [line for line in lines if re.match(rf"{CLOCK} iter ", line)]
    assert len(logged) >= iterations and all(" | elapsed " in line for line in logged)
    assert all(" | ETA " in line for line in logged if f" {iterations}/{iterations} " not in line)
    last = done.stdout.splitlines()[-1]
    results, runs = re.escape(str(run_dir / "results.json")), re.escape(str(run_dir / "wandb" / "offline-run-"))
    pointer = rf"{CLOCK} results: {results} \| W&B \(offline\), upload with: wandb sync {runs}\S+"
    assert re.fullmatch(pointer, last), last
    log = (run_dir / "train.log").read_text().splitlines()
    assert [line for line in log if re.match(rf"{CLOCK} iter ", line)] == logged  # rank 0's lines, from its process
    assert any("run directory:" in line for line in log) and log[-1] == last  # and the launching process's


@pytest.mark.slow
def test_a_failing_worker_stops_the_job_with_its_error(tmp_path, shared_cache):
    overrides = [*TINY, "parallel.tp=2", "optimizer.lr=1e20", "optimizer.warmup_iters=0", "optimizer.clip_grad=0"]
    done = train(tmp_path / "run", *overrides, "train.log_interval=2", "logger.wandb=false", cache=shared_cache)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "error: worker rank" in output and "TrainingDiverged: loss became nan" in output


@pytest.mark.slow
def test_the_default_run_learns_from_a_million_tokens_without_overfitting(tmp_path, shared_cache):
    """The default command (corpus, model, optimizer, batch, cadence), shortened to 100 iterations of 64 tokens."""
    run_dir = tmp_path / "run"
    done = train(run_dir, "train.iterations=100", "train.eval_interval=25", "data.seq_len=64", cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    line = re.search(r"data: train: (\d+) documents, (\d+) tokens", done.stdout + done.stderr)
    documents, tokens = int(line[1]), int(line[2])
    assert documents > 2000 and tokens > 1_000_000  # each chapter in two translations; every run's log says so
    metrics = records(run_dir)
    valid = [r["valid/loss"] for r in metrics if "valid/loss" in r]
    assert len(valid) == 4 and all(later < earlier for earlier, later in itertools.pairwise(valid)), valid
    last_train = [r["train/loss"] for r in metrics if "train/loss" in r][-1]
    assert abs(valid[-1] - last_train) < 0.1 * last_train, (valid[-1], last_train)  # tracks it: no overfitting


def test_gpt_8b_at_tp8_fails_before_any_worker_starts(tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    done = train(run_dir, "model=gpt_8b", "parallel.tp=8", cache=shared_cache)  # the preset selects GPT-2's BPE
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "needs ~133 GB" in errors[0] and "run it on 8 GPUs" in errors[0]
    assert not (run_dir / "logs").exists()


@pytest.mark.slow
def test_torchrun_ranks_join_one_job_and_agree_on_one_run_directory(tmp_path, shared_cache):
    # Microseconds in the run directory's name make every rank compose a different one; rank 0's must win.
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "megatron_exp.train", *TINY, "parallel.tp=2", "train.iterations=4", "train.eval_interval=0",
         "logger.wandb=false", f"data.cache_dir={shared_cache}", f"hydra.run.dir={tmp_path}/${{now:%H-%M-%S-%f}}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (run_dir,) = list(tmp_path.iterdir())
    assert (run_dir / "results.json").exists() and "tp: 2" in (run_dir / "config.yaml").read_text()
    assert [r["iteration"] for r in records(run_dir) if "train/loss" in r] == [1, 2, 3, 4]


def _start(run_dir: Path, *overrides: str, cache: str) -> subprocess.Popen:
    """The train command in its own process session, so a test can kill the whole job at once."""
    command = [sys.executable, "-m", "megatron_exp.train", *overrides, f"data.cache_dir={cache}"]
    return subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path, shared_cache):
    grid = ["parallel.tp=2", "parallel.dp=2", "parallel.micro_batch=2", "parallel.global_batch=8"]
    with_dropout = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]  # the RNG state must be restored
    common = [*TINY, *grid, *with_dropout, "train.iterations=30", "train.eval_interval=0", "checkpoint.interval=5"]
    common += ["logger.wandb=false"]
    done = train(tmp_path / "whole", *common, cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {r["iteration"]: r["train/loss"] for r in records(tmp_path / "whole") if "train/loss" in r}

    run_dir = tmp_path / "killed"
    job = _start(run_dir, *common, cache=shared_cache)
    latest = run_dir / "checkpoints" / "latest"
    _wait_for(latest.is_file, 240, "the first checkpoint")
    os.killpg(job.pid, signal.SIGKILL)  # parent and all four workers, mid-run
    job.wait(timeout=60)
    killed_at = max(r["iteration"] for r in records(run_dir) if "train/loss" in r)
    assert killed_at < 30, "the run finished before it could be killed"

    resumed = train(run_dir, *common, f"resume={run_dir}", cache=shared_cache)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    final = {r["iteration"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}  # last record wins
    assert sorted(final) == list(range(1, 31))
    assert final == expected  # bitwise: every iteration, including those re-run after the checkpoint


@pytest.mark.slow
def test_a_sweep_runs_every_job_in_one_group_and_the_analysis_lists_the_failed_ones(tmp_path, shared_cache):
    quick = [o for o in TINY if not o.startswith(("train.iterations", "model="))]
    quick += ["train.iterations=3", "logger.mode=offline", "checkpoint.save_final=false"]
    done = subprocess.run(
        [sys.executable, "-m", "megatron_exp.train", "-m", *quick, "model=gpt_tiny,gpt_mini",
         "parallel.tp=1,2,3",  # heads 4 and 8: tp=3 is invalid for both models
         f"data.cache_dir={shared_cache}", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {p.name: p for p in tmp_path.iterdir() if (p / ".hydra").is_dir()}
    finished = [n for n in jobs if not n.endswith("tp3")]
    assert len(jobs) == 6 and len(finished) == 4
    for name in set(jobs) - set(finished):
        failed = json.loads((jobs[name] / "failed.json").read_text())
        assert failed["exit_code"] == 2 and "is not divisible by parallel.tp=3" in failed["error"]
    groups = set()
    for name in finished:
        assert (jobs[name] / "results.json").is_file()
        assert list((jobs[name] / "wandb").glob("offline-run-*/run-*.wandb"))
        config = (jobs[name] / "config.yaml").read_text()
        groups |= {line.split(": ", 1)[1] for line in config.splitlines() if line.strip().startswith("group:")}
        assert f"- parallel.tp={name[-1]}" in config  # the job's overrides are its W&B tags
    assert len(groups) == 1 and groups.pop().startswith("sweep-")  # 4 W&B runs in one group

    analysis = subprocess.run([sys.executable, "-m", "megatron_exp.analyze", f"sweep={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert analysis.returncode == 0, analysis.stdout + analysis.stderr
    with open(tmp_path / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and sorted(r["status"] for r in rows) == ["done"] * 4 + ["failed"] * 2
    assert {"tokens_per_s", "tflops_per_device", "mfu", "efficiency", "paper_efficiency"} <= set(rows[0])
    assert all(float(r["efficiency"]) > 0 for r in rows if r["status"] == "done")
    image = matplotlib.image.imread(tmp_path / "scaling.png")
    assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0  # drawn, not blank
    assert (tmp_path / "scaling.md").read_text().count("\n") == 2 + 6
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the same figures as a W&B summary


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones_at_tp2(tmp_path, shared_cache):
    """train.compile=true compiles each layer in place: same losses and the same checkpoint keys as eager."""
    from megatron_exp.training import checkpoint

    losses, keys = {}, {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile-{compiled}"
        overrides = [*TINY, "parallel.tp=2", "train.iterations=4", "logger.wandb=false", f"train.compile={compiled}"]
        done = train(run_dir, *overrides, cache=shared_cache)
        assert done.returncode == 0, done.stdout + done.stderr
        losses[compiled] = [r["train/loss"] for r in records(run_dir) if "train/loss" in r]
        keys[compiled] = sorted(checkpoint.load_rank(checkpoint.resolve(run_dir), 1)["model"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert keys[True] == keys[False]


@pytest.mark.slow
def test_bert_resume_continues_exactly(tmp_path, shared_cache):
    """BERT samples (pairs, swaps, masks) follow from the data position: a resumed run repeats the original's
    losses bit for bit, dropout included, and metrics.jsonl keeps each iteration once."""
    run_dir = tmp_path / "bert"
    overrides = ["model=bert_tiny", "data.seq_len=64", "model.seq_len=64", "parallel.micro_batch=4",
                 "train.iterations=8", "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=1",
                 "train.test_iters=1", "checkpoint.interval=4", "checkpoint.keep=0", "logger.wandb=false"]  # fmt: skip
    done = train(run_dir, *overrides, cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    original = {r["iteration"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}
    done = train(tmp_path / "unused", *overrides, f"resume={run_dir / 'checkpoints' / 'iter_0000004'}",
                 cache=shared_cache)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    logged = [(r["iteration"], r["train/loss"]) for r in records(run_dir) if "train/loss" in r]
    assert [i for i, _ in logged] == list(range(1, 9))  # iterations 5-8 ran twice, and are recorded once
    assert dict(logged) == original


@pytest.mark.slow
def test_the_command_at_pp2_and_interleaved_logs_the_losses_of_pp1(tmp_path, shared_cache):
    short = [*TINY, "model.layers=4", "train.iterations=4", "train.eval_interval=0", "parallel.global_batch=8"]
    short += ["parallel.micro_batch=2", "checkpoint.save_final=false", "logger.wandb=false"]
    layouts = {
        "pp1": [],
        "pp2": ["parallel.pp=2"],
        "interleaved": ["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved"],
    }
    bubbles = {"pp2": "bubble (p - 1) / (v m) = 25.0%", "interleaved": "bubble (p - 1) / (v m) = 12.5%"}
    losses = {}
    for name, layout in layouts.items():
        done = train(tmp_path / name, *short, *layout, cache=shared_cache)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert bubbles[name] in output if name in bubbles else "pipeline:" not in output  # the analytic bubble
        losses[name] = [r["train/loss"] for r in records(tmp_path / name) if "train/loss" in r]
    assert len(losses["pp1"]) == 4
    for name in ("pp2", "interleaved"):
        assert losses[name] == pytest.approx(losses["pp1"], rel=1e-5), name


@pytest.mark.slow
def test_sequence_parallelism_logs_the_losses_of_plain_tp(tmp_path, shared_cache):
    """parallel.sequence_parallel=true at tp=2 (and with a tp2 x pp2 pipeline) trains the same model: the same
    losses to fp32 rounding (dropout off: its masks on shards are per rank)."""
    short = [*TINY, "model.layers=4", "train.iterations=4", "train.eval_interval=0", "parallel.micro_batch=2",
             "parallel.global_batch=4", "checkpoint.save_final=false", "logger.wandb=false",
             "parallel.tp=2"]  # fmt: skip
    layouts = {"tp2": [], "sp": ["parallel.sequence_parallel=true"],
               "sp_pp2": ["parallel.sequence_parallel=true", "parallel.pp=2"]}  # fmt: skip
    losses = {}
    for name, layout in layouts.items():
        done = train(tmp_path / name, *short, *layout, cache=shared_cache)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        losses[name] = [r["train/loss"] for r in records(tmp_path / name) if "train/loss" in r]
    assert "no sample at parallel.sequence_parallel=true" in (tmp_path / "sp" / "train.log").read_text()
    assert len(losses["tp2"]) == 4
    for name in ("sp", "sp_pp2"):
        assert losses[name] == pytest.approx(losses["tp2"], rel=1e-5), name
