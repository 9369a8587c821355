import json
import logging
import sys
import threading
import time
import types

import pytest

from megatron_exp.config import LoggerConfig
from megatron_exp.training.metrics import MetricSinks, console_line, wandb_pointer, wandb_settings, write_json

TRAIN = {
    "iteration": 10,
    "train/loss": 5.0,
    "train/ppl": 148.41,
    "train/lr": 1e-3,
    "train/grad_norm": 0.5,
    "perf/tokens_per_s": 1000.0,
    "perf/tflops_per_device": 0.05,
    "perf/mfu": 0.25,
    "perf/step_time_s": 0.2,
}


class FakeRun:
    def __init__(self, fail_on_log=False):
        self.logged, self.finished, self.fail_on_log = [], False, fail_on_log
        self.metrics, self.summary = [], {}

    def define_metric(self, name, **options):
        self.metrics.append((name, options))

    def log(self, values, step):
        if self.fail_on_log:
            raise ConnectionError("network down")
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def _fake_wandb(monkeypatch, run=None, init_error=None):
    module = types.ModuleType("wandb")
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if init_error:
            raise init_error
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def _jsonl(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_and_wandb_receive_the_same_values(tmp_path, monkeypatch):
    run = FakeRun()
    calls = _fake_wandb(monkeypatch, run)
    sinks = MetricSinks(tmp_path, 100, {"project": "p", "group": "g", "job_type": "train"})
    sinks.log(TRAIN)
    sinks.log({"iteration": 10, "valid/loss": 4.0, "valid/ppl": 54.6})
    sinks.close()
    assert calls == [{"project": "p", "group": "g", "job_type": "train"}]
    assert _jsonl(tmp_path) == [TRAIN, {"iteration": 10, "valid/loss": 4.0, "valid/ppl": 54.6}]
    for (step, values), record in zip(run.logged, _jsonl(tmp_path), strict=True):
        assert step == record["iteration"] and values == record  # iteration too: it is every chart's x-axis
    assert run.metrics == [("iteration", {}), ("*", {"step_metric": "iteration"})]
    assert run.finished


def test_wandb_that_cannot_start_is_a_warning(tmp_path, monkeypatch, caplog):
    _fake_wandb(monkeypatch, init_error=RuntimeError("no service"))
    with caplog.at_level(logging.WARNING):
        sinks = MetricSinks(tmp_path, 100, {"project": "p"})
        sinks.log(TRAIN)
        sinks.close()
    assert "W&B could not start (no service); training continues" in caplog.text
    assert _jsonl(tmp_path) == [TRAIN]


def test_wandb_failing_mid_run_is_a_warning_and_logging_goes_on(tmp_path, monkeypatch, caplog):
    _fake_wandb(monkeypatch, FakeRun(fail_on_log=True))
    with caplog.at_level(logging.WARNING):
        sinks = MetricSinks(tmp_path, 100, {"project": "p"})
        sinks.log(TRAIN)
        sinks.log({**TRAIN, "iteration": 20})
        sinks.close()
    assert caplog.text.count("W&B logging failed (network down)") == 1
    assert [r["iteration"] for r in _jsonl(tmp_path)] == [10, 20]


def test_console_line_shows_loss_ppl_and_mfu():
    line = console_line(TRAIN, 100)
    assert line.startswith("iter  10/100 | loss 5.0000 | ppl 148.41 | lr 1.00e-03 | grad 0.500")
    assert "MFU 25.0%" in line and "1000 tok/s" in line
    assert "valid ppl 54.60" in console_line({"iteration": 10, "valid/loss": 4.0, "valid/ppl": 54.6}, 100)


def test_console_line_ends_with_the_time_so_far_and_the_time_left():
    line = console_line(TRAIN, 100, elapsed_s=30.0)  # 10 of 100 iterations in 30 s: 90 more take 4.5 minutes
    assert line.endswith("| 0.200 s/it | elapsed 0:30 | ETA 4:30"), line
    assert console_line(TRAIN, 100, elapsed_s=30.0, first_iteration=5).endswith("ETA 9:00")  # resumed at 5
    assert console_line({**TRAIN, "iteration": 100}, 100, elapsed_s=3725.0).endswith("| elapsed 1:02:05")  # done


def test_every_console_line_carries_the_elapsed_time_and_eta(tmp_path, caplog):
    sinks = MetricSinks(tmp_path, 100, None)
    with caplog.at_level(logging.INFO):
        sinks.log(TRAIN)
        sinks.log({"iteration": 10, "valid/loss": 4.0, "valid/ppl": 54.6})
        sinks.log({**TRAIN, "iteration": 100})
    sinks.close()
    lines = [m for m in caplog.messages if m.startswith("iter")]
    assert len(lines) == 3 and all(" | elapsed 0:00" in m for m in lines)
    assert all(m.endswith(" | ETA 0:00") for m in lines[:2]) and "ETA" not in lines[2]


def test_the_last_line_points_at_the_w_and_b_run(tmp_path):
    offline = {"id": "abc123", "mode": "offline", "dir": str(tmp_path), "entity": None, "project": "megatron-exp"}
    assert wandb_pointer(None) == "" and wandb_pointer(offline) == ""  # off, or it never started: nothing to sync
    runs = [tmp_path / "wandb" / f"offline-run-2026120{day}_101010-abc123" for day in (2, 3)]  # started, resumed
    for run in [*runs, tmp_path / "wandb" / "offline-run-20261201_101010-other"]:
        run.mkdir(parents=True)
    assert wandb_pointer(offline) == f" | W&B (offline), upload with: wandb sync {runs[0]} {runs[1]}"
    online = {**offline, "mode": "online", "entity": "lab"}
    assert wandb_pointer(online) == " | W&B: lab/megatron-exp/runs/abc123"


def test_records_are_valid_json_with_non_finite_values_as_null(tmp_path):
    sinks = MetricSinks(tmp_path, 100, None)
    sinks.log({"iteration": 1, "test/accuracy_high": None, "train/loss": float("nan"), "x": float("inf")})
    sinks.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"iteration": 1, "test/accuracy_high": None, "train/loss": None, "x": None}
    write_json(tmp_path / "results.json", {"a": [1.0, float("-inf")], "b": {"c": float("nan")}})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": [1.0, None], "b": {"c": None}}


def test_a_resumed_run_keeps_each_iteration_once(tmp_path):
    sinks = MetricSinks(tmp_path, 100, None)
    for iteration in range(1, 8):
        sinks.log({"iteration": iteration, "train/loss": 1.0})
    sinks.close()
    resumed = MetricSinks(tmp_path, 100, None, after=4)  # the checkpoint was at 4; 5-7 will be logged again
    resumed.log({"iteration": 5, "train/loss": 2.0})
    resumed.close()
    assert [(r["iteration"], r["train/loss"]) for r in _jsonl(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0),
                                                                             (5, 2.0)]  # fmt: skip


@pytest.mark.slow
def test_wandb_starts_in_the_background_and_a_slow_start_is_bounded(tmp_path, monkeypatch, caplog):
    run = FakeRun()
    started = threading.Event()
    module = types.ModuleType("wandb")

    def slow_init(**kwargs):
        started.wait(5)  # W&B is still starting while training logs
        return run

    module.init = slow_init
    monkeypatch.setitem(sys.modules, "wandb", module)
    sinks = MetricSinks(tmp_path, 100, {"project": "p", "settings": {"init_timeout": 1}})
    sinks.log(TRAIN)  # returns at once: the record waits for W&B
    assert run.logged == [] and _jsonl(tmp_path) == [TRAIN]
    started.set()
    sinks.log({**TRAIN, "iteration": 20})
    sinks.close()
    assert [step for step, _ in run.logged] == [10, 20] and run.finished

    never = types.ModuleType("wandb")
    never.init = lambda **kwargs: time.sleep(30)
    monkeypatch.setitem(sys.modules, "wandb", never)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        (tmp_path / "stuck").mkdir()
        stuck = MetricSinks(tmp_path / "stuck", 100, {"project": "p", "settings": {"init_timeout": 1}})
        stuck.log(TRAIN)
        stuck.close()
    assert time.monotonic() - start < 15 and "W&B did not start within 11 s" in caplog.text


def test_the_final_results_become_the_wandb_summary(tmp_path, monkeypatch):
    run = FakeRun()
    _fake_wandb(monkeypatch, run)
    sinks = MetricSinks(tmp_path, 100, {"project": "p"})
    sinks.log(TRAIN)
    final = {**TRAIN, "valid/loss": 4.0, "test/loss": 4.1, "test/ppl": float("inf")}
    sinks.close(summary=final)
    assert run.summary == {**final, "test/ppl": None} and run.finished


@pytest.mark.parametrize("gpu", [True, False])
def test_system_metrics_are_sampled_on_gpu_runs_only(tmp_path, gpu):
    settings = wandb_settings(LoggerConfig(), str(tmp_path), {}, gpu=gpu)["settings"]
    assert settings["x_disable_stats"] is not gpu


def test_a_real_offline_wandb_run_takes_the_settings_metric_definitions_and_summary(tmp_path, monkeypatch):
    """wandb itself checks every setting and define_metric call (a name or option it does not know fails here);
    the run's summary is read as it finishes."""
    import wandb
    from wandb.sdk.wandb_run import Run

    defined, summaries = [], []
    real_define_metric, real_finish = Run.define_metric, Run.finish

    def define_metric(self, name, **options):
        defined.append((name, options))
        return real_define_metric(self, name, **options)

    def finish(self, *args, **kwargs):
        summaries.append(dict(self.summary))
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(Run, "define_metric", define_metric)
    monkeypatch.setattr(Run, "finish", finish)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for gpu in (True, False):
        wandb.Settings(**wandb_settings(LoggerConfig(), str(tmp_path), {}, gpu=gpu)["settings"])  # refuses unknowns
    kwargs = wandb_settings(LoggerConfig(mode="offline"), str(tmp_path), {"model": {"name": "m"}}, gpu=True)
    sinks = MetricSinks(tmp_path, 100, kwargs)
    sinks.log(TRAIN)
    sinks.close(summary={**TRAIN, "test/loss": 4.1})
    assert sinks.wandb is not None, "W&B did not start: see the warning"
    assert defined == [("iteration", {}), ("*", {"step_metric": "iteration"})]
    assert len(summaries) == 1 and summaries[0]["test/loss"] == 4.1 and summaries[0]["iteration"] == 10
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
