"""Where metrics go, from global rank 0: a console progress line, metrics.jsonl in the run directory, and W&B.

W&B is optional at every step: if it cannot start or fails while logging, a warning is printed once and the run
goes on with the other sinks. Every record carries the same values in the jsonl file and in W&B.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)


def console_line(record: dict, total_iterations: int) -> str:
    """One progress line from a train or eval record."""
    it = f"iter {record['iteration']:>{len(str(total_iterations))}}/{total_iterations}"
    parts = [it]
    for split in ("valid", "dev", "test"):
        if f"{split}/loss" in record:
            parts.append(f"{split} loss {record[f'{split}/loss']:.4f} | {split} ppl {record[f'{split}/ppl']:.2f}")
        if f"{split}/accuracy" in record:
            parts.append(f"{split} acc {100 * record[f'{split}/accuracy']:.1f}%")
        if f"{split}/sop_accuracy" in record:
            parts.append(f"{split} SOP acc {100 * record[f'{split}/sop_accuracy']:.1f}%")
    if "train/loss" in record:
        parts.append(f"loss {record['train/loss']:.4f}")
        if "train/ppl" in record:
            parts.append(f"ppl {record['train/ppl']:.2f}")
        parts += [f"lr {record['train/lr']:.2e}", f"grad {record['train/grad_norm']:.3f}"]
        if "train/loss_scale" in record:
            parts.append(f"scale {record['train/loss_scale']:.0f}")
        parts += [
            f"{record['perf/tokens_per_s']:.0f} tok/s",
            f"{record['perf/tflops_per_device']:.3f} TFLOP/s/dev",
        ]
        if "perf/mfu" in record:  # absent when the hardware's peak is unknown
            parts.append(f"MFU {100 * record['perf/mfu']:.1f}%")
        parts.append(f"{record['perf/step_time_s']:.3f} s/it")
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


def wandb_settings(cfg, name: str | None = None, group: str | None = None) -> dict | None:
    """Arguments for wandb.init from a config with `logger` and `run_dir` (training or evaluation), or None when
    W&B is off. The run's id is kept in the run directory, so a resumed run logs to the same W&B run."""
    lg = cfg.logger
    if not lg.wandb or lg.mode == "disabled":
        return None
    id_file = Path(cfg.run_dir) / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:12])
    return {
        "id": id_file.read_text().strip(),
        "resume": "allow",
        "project": lg.project,
        "entity": lg.entity,
        "name": lg.name or name or Path(cfg.run_dir).name,
        "group": lg.group or group,
        "tags": list(lg.tags),
        "job_type": lg.job_type,
        "config": asdict(cfg),
        "dir": cfg.run_dir,
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
