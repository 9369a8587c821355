"""The CPU benchmark runs end to end (tiny shape) and its communication matches the paper's count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python benchmarks/<script> <args> --out <out>` from the repository root: its output and its JSON."""
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_benchmark_quick_run_reports_every_measurement(tmp_path):
    done, results = run_benchmark("cpu_training.py", tmp_path / "bench.json", "--quick")
    assert results["matmul_ceiling_tflops"] > 0 and results["plain_vs_framework"]["speed_ratio"] > 0
    saved = [results["recompute"][mode]["activation_mb"] for mode in ("none", "selective", "full")]
    assert saved == sorted(saved, reverse=True) and saved[0] > saved[2]
    assert all(row["peak_mb"] > 0 for row in results["recompute"].values())
    tp2, analytic = results["tp_scaling"]["2"], results["analytic_all_reduces_per_step"]
    assert (tp2["all_reduces"], tp2["bytes"]) == (analytic["count"], analytic["bytes"])  # exactly the paper's
    assert "| framework / plain throughput |" in done.stdout
    assert results["compile"]["compiled_s"] > 0 and "torch.compile of each layer" in done.stdout
    assert results["allocator"]["default_s"] > 0 and "glibc keeps freed memory" in done.stdout


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model(tmp_path):
    options = ["--device", "cpu", "--model", "gpt_tiny", "--micro-batches", "2", "--precision", "fp32", "--steps", "1"]
    done, results = run_benchmark("gpu_training.py", tmp_path / "gpu.json", *options, "--compile", "both")
    combinations = [(r["recompute"], r["compile"]) for r in results["rows"]]
    assert combinations == [(mode, compiled) for mode in ("none", "selective", "full") for compiled in (False, True)]
    assert all("error" not in r and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in results["rows"])
    assert "| micro batch | recompute | compile |" in done.stdout


@pytest.mark.slow
def test_pipeline_benchmark_quick_run_reports_step_time_against_the_bubble(tmp_path):
    done, results = run_benchmark("pipeline.py", tmp_path / "pipeline.json", "--quick")
    rows = results["rows"]
    assert [(r["pp"], r["virtual"]) for r in rows] == [(1, 1), (2, 1), (2, 2)]
    assert [r["bubble"] for r in rows] == [0.0, 1 / 4, 1 / 8]  # (p - 1) / (v m), m = 4
    assert all(r["s"] > 0 and len(r["idle_per_stage"]) == r["pp"] for r in rows)
    assert all(0 < idle < 1 for r in rows[1:] for idle in r["idle_per_stage"])  # stages of a pipeline wait
    assert "| measured / predicted |" in done.stdout


@pytest.mark.slow
def test_distributed_optimizer_benchmark_quick_run_compares_the_three_optimizers(tmp_path):
    _, results = run_benchmark("distributed_optimizer.py", tmp_path / "distributed_optimizer.json", "--quick")
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["plain", "zero", "ours"] and all(r["update_s"] > 0 for r in rows.values())
    assert rows["plain"]["fullest_vs_even"] == 2.0 and rows["ours"]["fullest_vs_even"] == 1.0  # 1/dp of Adam each
    assert rows["ours"]["loss"] == pytest.approx(rows["plain"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_memory_benchmark_quick_run_measures_what_each_option_saves_per_rank(tmp_path):
    done, results = run_benchmark("memory.py", tmp_path / "memory.json", "--quick", "--steps", "1")
    rows = {r["option"]: r for r in results["rows"]}
    assert list(rows) == ["recompute=none", "recompute=selective", "recompute=full", "tp=2", "tp=2, sequence_parallel",
                          "dp=2, plain optimizer", "dp=2, distributed_optimizer"]  # fmt: skip
    assert [len(r["ranks"]) for r in rows.values()] == [1, 1, 1, 2, 2, 2, 2]  # one entry per rank
    ranks = [rank for r in rows.values() for rank in r["ranks"]]
    assert all(r["peak_bytes"] > r["resident_bytes"] > r["adam_bytes"] > 0 and r["saved_bytes"] > 0 for r in ranks)
    assert all(0.5 < r["predicted_vs_measured"] < 2 and r["s"] > 0 for r in ranks)
    assert done.stdout.count("\n| ") == 1 + len(ranks) and "| planner / measured |" in done.stdout  # header + ranks

    def each(option, key):
        return [rank[key] for rank in rows[option]["ranks"]]

    # with attention dropout on CPU, none keeps the math path's s x s scores, which selective frees
    saved = [each(f"recompute={mode}", "saved_bytes")[0] for mode in ("none", "selective", "full")]
    assert saved[0] > saved[1] > saved[2]
    peaks = [each(f"recompute={mode}", "peak_bytes")[0] for mode in ("none", "selective", "full")]
    assert peaks[1] <= peaks[0] and peaks[2] < peaks[0]
    for key in ("saved_bytes", "peak_bytes"):  # sequence parallelism shrinks every TP rank's activations
        assert all(sp < tp for sp, tp in zip(each("tp=2, sequence_parallel", key), each("tp=2", key), strict=True))
    assert each("tp=2, sequence_parallel", "adam_bytes") == each("tp=2", "adam_bytes")
    plain, sharded = each("dp=2, plain optimizer", "adam_bytes"), each("dp=2, distributed_optimizer", "adam_bytes")
    assert plain[0] == plain[1] and all(s == pytest.approx(plain[0] / 2, abs=8) for s in sharded)  # 1/dp each
