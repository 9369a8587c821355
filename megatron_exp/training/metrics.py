"""Where metrics go, from global rank 0: a console progress line, metrics.jsonl in the run directory, and W&B.

W&B is optional at every step: if it cannot start or fails while logging, a warning is printed once and the run
goes on with the other sinks. Every record carries the same values in the jsonl file and in W&B. On the W&B
dashboard every metric plots against `iteration` (and `tokens_seen` is there to plot against instead), and the
run's summary holds the final results (the last training record with the final validation and test).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from megatron_exp.config import LoggerConfig

log = logging.getLogger(__name__)


# (label, format) of the keys whose last part says too little; every other key is labelled by itself.
_SHOWN = {
    "train/lr": ("lr", "{:.2e}"),
    "train/grad_norm": ("grad", "{:.3f}"),
    "train/loss_scale": ("scale", "{:.0f}"),
    "perf/tokens_per_s": ("", "{:.0f} tok/s"),
    "perf/tflops_per_device": ("", "{:.3f} TFLOP/s/dev"),
    "perf/mfu": ("MFU", "{:.1%}"),
    "perf/step_time_s": ("", "{:.3f} s/it"),
    "perf/peak_memory_gb": ("mem", "{:.2f} GB"),
}
# hfu follows from mfu, tokens seen from the iteration; skipped steps are shown when there are any
_HIDDEN = {"iteration", "tokens_seen", "perf/hfu", "train/skipped_steps"}


def _shown(key: str, value) -> str:
    label, style = _SHOWN.get(key, (None, None))
    if label is None:
        split, _, name = key.rpartition("/")
        label = " ".join(part for part in (split.removeprefix("train"), name.replace("accuracy", "acc")) if part)
        if value is None:
            return f"{label} n/a"
        is_share = "accuracy" in name
        style = "{:.1%}" if is_share else "{:.2f}" if name == "ppl" else "{:.4f}" if "loss" in name else None
        if style is None:
            style = "{:.4g}" if isinstance(value, float) else "{}"
    text = style.format(value)
    return f"{label} {text}" if label else text


def clock(seconds: float) -> str:
    """A duration as M:SS, or H:MM:SS from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def console_line(record: dict, total_iterations: int, elapsed_s: float | None = None, first_iteration: int = 0) -> str:
    """One progress line from any record: every key in the record's order, formatted by what it measures; then,
    given the seconds since `first_iteration` (where a resumed run started), the time so far and the time left at
    that pace."""
    iteration = record["iteration"]
    parts = [f"iter {iteration:>{len(str(total_iterations))}}/{total_iterations}"]
    parts += [_shown(key, value) for key, value in record.items() if key not in _HIDDEN]
    if record.get("train/skipped_steps"):
        parts.append(f"skipped {record['train/skipped_steps']}")
    if elapsed_s is not None:
        parts.append(f"elapsed {clock(elapsed_s)}")
        if first_iteration < iteration < total_iterations:
            left = elapsed_s / (iteration - first_iteration) * (total_iterations - iteration)
            parts.append(f"ETA {clock(left)}")
    return " | ".join(parts)


def json_safe(value):
    """NaN and infinities as null (JSON has neither, and readers other than Python's reject them), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value) -> None:
    """`value` as a JSON file, written atomically (a crash never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _keep_records_up_to(path: Path, iteration: int) -> None:
    """Drop the records after `iteration` (a resumed run logs them again), atomically."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] <= iteration]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class MetricSinks:
    def __init__(self, run_dir: Path, total_iterations: int, wandb_kwargs: dict | None, after: int = 0):
        """`after`: the iteration a resumed run continues from; metrics.jsonl keeps each iteration once, so the
        records past it (logged before the interruption, about to be logged again) are dropped."""
        self.run_dir, self.total_iterations, self.first_iteration = Path(run_dir), total_iterations, after
        self.started = time.monotonic()  # elapsed time and ETA count from here
        self.warned_utilization = False  # a logged MFU above 100% is flagged once
        (self.run_dir / "interrupted.json").unlink(missing_ok=True)  # from an earlier interruption, resumed now
        if after:
            _keep_records_up_to(self.run_dir / "metrics.jsonl", after)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole run
        self.wandb = None  # the W&B run, once it has started
        self._waiting: list[dict] = []  # records logged while W&B starts
        self._starting = None
        if wandb_kwargs is not None:
            # In a thread: W&B may take up to its init_timeout (minutes without a network), and neither training
            # nor the other ranks (waiting for this one in the first collective) should wait for it.
            self._start_timeout = wandb_kwargs.get("settings", {}).get("init_timeout", 90) + 10
            self._starting = threading.Thread(target=self._start_wandb, args=(wandb_kwargs,), daemon=True)
            self._starting.start()

    def _start_wandb(self, kwargs: dict) -> None:
        try:
            import wandb

            run = wandb.init(**kwargs)
            run.define_metric("iteration")
            run.define_metric("*", step_metric="iteration")  # the x-axis of every chart, not W&B's own step
            self._started = run
        except Exception as error:
            self._started = None
            log.warning("W&B could not start (%s); training continues without it", error)

    def _to_wandb(self, record: dict | None, wait: bool = False) -> None:
        """Send `record` (and those waiting) once W&B is up; until then they wait, and if it never starts they
        stay only in metrics.jsonl."""
        if record is not None and (self._starting is not None or self.wandb is not None):
            self._waiting.append(record)
        if self._starting is not None:
            self._starting.join(timeout=self._start_timeout if wait else 0)
            if self._starting.is_alive():
                if wait:
                    log.warning("W&B did not start within %d s; the metrics are in metrics.jsonl", self._start_timeout)
                return
            self._starting, self.wandb = None, self._started
        waiting, self._waiting = self._waiting, []
        for queued in waiting if self.wandb is not None else []:
            try:
                self.wandb.log(queued, step=queued["iteration"])
            except Exception as error:
                log.warning("W&B logging failed (%s); continuing without W&B", error)
                self.wandb = None
                return

    def log(self, record: dict) -> None:
        """Write one record (must contain `iteration`) to every sink."""
        self.jsonl.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.jsonl.flush()
        elapsed = time.monotonic() - self.started
        log.info(console_line(record, self.total_iterations, elapsed, self.first_iteration))
        self._to_wandb(record)

    def interrupted(self, iteration: int, signum: int, latest_checkpoint: str | None) -> None:
        """Say where a run stopped on a signal: interrupted.json (read by the launching process) and the log."""
        record = {"iteration": iteration, "signal": signal.Signals(signum).name, "checkpoint": latest_checkpoint}
        write_json(self.run_dir / "interrupted.json", record)
        log.info("stopped by %s after iteration %d; newest checkpoint: %s", record["signal"], iteration,
                 latest_checkpoint or "none")  # fmt: skip

    def close(self, summary: dict | None = None) -> None:
        """Flush every sink; `summary` (the final results) becomes the W&B run's summary."""
        self.jsonl.close()
        self._to_wandb(None, wait=True)
        if self.wandb is not None:
            try:
                if summary:
                    self.wandb.summary.update(json_safe(summary))
                self.wandb.finish()
            except Exception as error:
                log.warning("W&B did not finish cleanly (%s)", error)


def wandb_settings(
    lg: LoggerConfig, run_dir: str, config: dict, name: str | None = None, group: str | None = None, *, gpu: bool
) -> dict | None:
    """Arguments for wandb.init (the run's whole `config` recorded), or None when W&B is off. The run's id is kept
    in the run directory, so a resumed run logs to the same W&B run. `gpu`: the run trains on GPUs, and W&B's
    system metrics chart their utilization, memory and power beside the run's own; a CPU run (tests, CI, laptops)
    leaves the sampling off, so the cores stay with the workers."""
    if not lg.wandb or lg.mode == "disabled":
        return None
    id_file = Path(run_dir) / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    return {
        "id": id_file.read_text().strip(),
        "resume": "allow",
        "project": lg.project,
        "entity": lg.entity,
        "name": lg.name or name or Path(run_dir).name,
        "group": lg.group or group,
        "tags": list(lg.tags),
        "job_type": lg.job_type,
        "config": config,
        "dir": run_dir,
        "mode": lg.mode,
        "settings": {
            "console": "off",
            "silent": True,  # the run's last line says where its W&B files are (wandb_pointer)
            "x_disable_stats": not gpu,
            "disable_git": True,
            "init_timeout": lg.init_timeout_s,
        },
    }


def wandb_pointer(wandb_kwargs: dict | None) -> str:
    """Where a finished run's W&B record is, for its last console line: the command that uploads an offline run
    (each resumption wrote a directory of its own), or the online run's path; empty when there is none."""
    if wandb_kwargs is None:
        return ""
    if wandb_kwargs["mode"] == "online":
        path = "/".join(str(part) for part in (wandb_kwargs["entity"], wandb_kwargs["project"]) if part)
        return f" | W&B: {path}/runs/{wandb_kwargs['id']}"
    offline = sorted(Path(wandb_kwargs["dir"]).glob(f"wandb/offline-run-*-{wandb_kwargs['id']}"))
    return f" | W&B (offline), upload with: wandb sync {' '.join(map(str, offline))}" if offline else ""


def publish(wandb_kwargs: dict | None, values: dict) -> None:
    """Record one set of final values (an evaluation) as a W&B run; a failure is a warning."""
    if wandb_kwargs is None:
        return
    try:
        import wandb

        run = wandb.init(**wandb_kwargs)
        run.log(values)
        run.summary.update(values)
        run.finish()
    except Exception as error:
        log.warning("W&B could not record the results (%s); they are in results.json", error)
