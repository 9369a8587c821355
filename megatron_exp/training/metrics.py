"""Where metrics go, from global rank 0: a console progress line, metrics.jsonl in the run directory, and W&B.

W&B is optional at every step: if it cannot start or fails while logging, a warning is printed once and the run
goes on with the other sinks. Every record carries the same values in the jsonl file and in W&B.
"""

from __future__ import annotations

import json
import logging
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
_HIDDEN = {"iteration", "perf/hfu", "train/skipped_steps"}  # hfu follows from mfu; skipped steps: when there are any


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


def console_line(record: dict, total_iterations: int) -> str:
    """One progress line from any record: every key in the record's order, formatted by what it measures."""
    parts = [f"iter {record['iteration']:>{len(str(total_iterations))}}/{total_iterations}"]
    parts += [_shown(key, value) for key, value in record.items() if key not in _HIDDEN]
    if record.get("train/skipped_steps"):
        parts.append(f"skipped {record['train/skipped_steps']}")
    return " | ".join(parts)


class MetricSinks:
    def __init__(self, run_dir: Path, total_iterations: int, wandb_kwargs: dict | None):
        self.total_iterations = total_iterations
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole run
        self.wandb = None
        if wandb_kwargs is not None:
            self._start_wandb(wandb_kwargs)

    def _start_wandb(self, kwargs: dict) -> None:
        try:
            import wandb

            self.wandb = wandb.init(**kwargs)
        except Exception as error:
            log.warning("W&B could not start (%s); training continues without it", error)

    def log(self, record: dict) -> None:
        """Write one record (must contain `iteration`) to every sink."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        log.info(console_line(record, self.total_iterations))
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"])
            except Exception as error:
                log.warning("W&B logging failed (%s); continuing without W&B", error)
                self.wandb = None

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as error:
                log.warning("W&B did not finish cleanly (%s)", error)


def wandb_settings(
    lg: LoggerConfig, run_dir: str, config: dict, name: str | None = None, group: str | None = None
) -> dict | None:
    """Arguments for wandb.init (the run's whole `config` recorded), or None when W&B is off. The run's id is kept
    in the run directory, so a resumed run logs to the same W&B run."""
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
        "settings": {"console": "off", "quiet": True, "x_disable_stats": True, "disable_git": True},
    }


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
