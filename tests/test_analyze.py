"""Sweep analysis compares like with like: efficiency and speedup within one series (a model, or an experiment
family whose model grows with TP), never one model against another's baseline."""

import json

import pytest
import yaml

from megatron_exp.analyze import analyze, write_outputs


def _job(sweep, name: str, model: str, tp: int, tflops: float, tokens: float, experiment: str | None = None, pp=1):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"experiment": experiment}}}})
    )
    (job / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name": model}, "parallel": {"tp": tp, "pp": pp, "dp": 1}})
    )
    records = [{"iteration": i, "train/loss": 5.0, "perf/tokens_per_s": tokens, "perf/tflops_per_device": tflops}
               for i in (1, 2, 3)]  # fmt: skip
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_two_model_sweep_is_analysed_within_each_model(tmp_path):
    _job(tmp_path, "0_gpt_tiny_tp1", "gpt_tiny", 1, tflops=0.01, tokens=1000)
    _job(tmp_path, "1_gpt_tiny_tp2", "gpt_tiny", 2, tflops=0.008, tokens=1600)
    _job(tmp_path, "2_gpt_mini_tp1", "gpt_mini", 1, tflops=0.1, tokens=300)
    _job(tmp_path, "3_gpt_mini_tp2", "gpt_mini", 2, tflops=0.09, tokens=540)
    weak = {r["job"]: r for r in analyze(tmp_path, "weak")}
    assert weak["1_gpt_tiny_tp2"]["efficiency"] == pytest.approx(0.8)  # against gpt_tiny at TP=1, not gpt_mini
    assert weak["3_gpt_mini_tp2"]["efficiency"] == pytest.approx(0.9)
    assert weak["0_gpt_tiny_tp1"]["efficiency"] == weak["2_gpt_mini_tp1"]["efficiency"] == 1.0
    strong = {r["job"]: r for r in analyze(tmp_path, "strong")}
    assert strong["1_gpt_tiny_tp2"]["speedup"] == pytest.approx(1.6)
    assert strong["3_gpt_mini_tp2"]["speedup"] == pytest.approx(1.8)


def test_an_experiment_family_is_one_weak_scaling_series_across_models(tmp_path):
    _job(tmp_path, "0", "gpt_1b", 1, tflops=0.2, tokens=100, experiment="weak_1b_tp1")
    _job(tmp_path, "1", "gpt_2b", 2, tflops=0.15, tokens=100, experiment="weak_2b_tp2")
    _job(tmp_path, "2", "gpt_tiny", 2, tflops=0.01, tokens=100, experiment="cpu_weak_tp2")  # no TP=1 baseline
    rows = {r["job"]: r for r in analyze(tmp_path, "weak")}
    assert rows["1"]["series"] == rows["0"]["series"] == "weak" and rows["1"]["efficiency"] == pytest.approx(0.75)
    assert rows["2"]["series"] == "cpu_weak" and "efficiency" not in rows["2"]


def test_pipeline_jobs_compare_with_the_series_base_without_model_parallelism(tmp_path):
    _job(tmp_path, "0_gpt_mini_tp1", "gpt_mini", 1, tflops=0.1, tokens=1000)
    _job(tmp_path, "1_gpt_mini_tp1_pp2", "gpt_mini", 1, tflops=0.08, tokens=1600, pp=2)
    _job(tmp_path, "2_gpt_mini_tp2_pp2", "gpt_mini", 2, tflops=0.06, tokens=2400, pp=2)
    _job(tmp_path, "3_gpt_mini_tp2", "gpt_mini", 2, tflops=0.09, tokens=1800)
    strong = {r["job"]: r for r in analyze(tmp_path, "strong")}
    assert [strong[j]["pp"] for j in sorted(strong)] == [1, 2, 2, 1]
    assert strong["1_gpt_mini_tp1_pp2"]["speedup"] == pytest.approx(1.6)
    assert strong["2_gpt_mini_tp2_pp2"]["speedup"] == pytest.approx(2.4)
    assert strong["3_gpt_mini_tp2"]["paper_speedup"] == 1.64  # the paper measured TP alone
    assert strong["2_gpt_mini_tp2_pp2"]["paper_speedup"] is None
    weak = {r["job"]: r for r in analyze(tmp_path, "weak")}
    assert weak["2_gpt_mini_tp2_pp2"]["efficiency"] == pytest.approx(0.6)
    write_outputs(list(strong.values()), tmp_path, "strong")
    header, _, *lines = (tmp_path / "scaling.md").read_text().splitlines()
    assert "| tp | pp |" in header and "| 2 | 2 |" in next(line for line in lines if "tp2_pp2" in line)
