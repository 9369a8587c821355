"""`python -m megatron_exp.analyze sweep=<sweep dir>`: a sweep's scaling table and plot, from its run directories.

Reads each job's config.yaml, metrics.jsonl, results.json or failed.json (no network; a job is any directory under
the sweep that Hydra marked with .hydra/) and writes, into the sweep directory, scaling.md and scaling.csv (one row
per job: throughput, TFLOP/s per device, MFU, and efficiency against the job of its series without model
parallelism, TP = PP = 1) and scaling.png. Throughput numbers are medians over the logged windows after the first
(which includes start-up). Two readings of efficiency, as in the paper's Figure 5: weak scaling (the model grows
with TP) compares TFLOP/s per device with the TP=1 baseline; strong scaling (one model) compares tokens/s, as a
speedup. Jobs are compared only within their series: one experiment family of conf/experiment/ (the model growing
with TP, as the paper pairs them), otherwise one model: never one model against another's baseline. The paper's
numbers are shown beside where it reports them.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import statistics
from pathlib import Path

import matplotlib
import yaml
from omegaconf import DictConfig

from megatron_exp import entry
from megatron_exp.config import AnalyzeConfig, ConfigError, check_ranges
from megatron_exp.training.metrics import publish

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

log = logging.getLogger("megatron_exp.analyze")

# Shoeybi et al. 2019: weak-scaling efficiency of model parallelism (8-way TP, 8.3B: 77%) and the strong-scaling
# speedups of the 1.2B model at batch 8 on 1/2/4/8 GPUs.
PAPER_WEAK_EFFICIENCY = {1: 1.0, 8: 0.77}
PAPER_STRONG_SPEEDUP = {1: 1.0, 2: 1.64, 4: 2.34, 8: 2.98}


def _series(job: Path, model: str) -> str:
    """Which jobs compare with each other: those of one experiment family (conf/experiment/: weak_1b_tp1 ...
    weak_8b_tp8 are one weak-scaling series, cpu_weak_tp1 ... another), else those of one model."""
    hydra = job / ".hydra" / "hydra.yaml"
    choices = yaml.safe_load(hydra.read_text())["hydra"]["runtime"]["choices"] if hydra.is_file() else {}
    experiment = choices.get("experiment")
    return re.sub(r"_(\d+[bmk]_)?tp\d+(_pp\d+)?$", "", experiment) if experiment else model


def read_job(job: Path) -> dict:
    # The resolved config of a job that started; Hydra's composed one for a job that failed before that.
    source = job / "config.yaml" if (job / "config.yaml").is_file() else job / ".hydra" / "config.yaml"
    config = yaml.safe_load(source.read_text())
    model, parallel = config.get("model", {}).get("name", "?"), config.get("parallel", {})
    row = {
        "job": job.name,
        "series": _series(job, model),
        "model": model,
        "tp": parallel.get("tp"),
        "pp": parallel.get("pp", 1),
        "dp": parallel.get("dp"),
    }
    if row["pp"] > 1:
        row |= {"virtual_stages": parallel.get("virtual_stages", 1), "schedule": parallel.get("schedule")}
    if (job / "failed.json").is_file() or not (job / "metrics.jsonl").is_file():
        failure = json.loads((job / "failed.json").read_text()) if (job / "failed.json").is_file() else {}
        return {**row, "status": "failed", "error": failure.get("error", "no metrics")}
    lines = (job / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if "train/loss" in r]
    steady = train[1:] or train

    def median(key):
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    results = json.loads((job / "results.json").read_text()) if (job / "results.json").is_file() else {}
    return {**row, "status": "done", "tokens_per_s": median("perf/tokens_per_s"),
            "tflops_per_device": median("perf/tflops_per_device"), "mfu": median("perf/mfu"),
            "final_valid_loss": results.get("valid/loss")}  # fmt: skip


def analyze(sweep: Path, mode: str) -> list[dict]:
    # Hydra marks every job's directory; jobs may sit in subdirectories (one sweep per model size, say).
    jobs = sorted(marker.parent for marker in sweep.rglob(".hydra") if marker.is_dir())
    rows = [{**read_job(job), "job": str(job.relative_to(sweep))} for job in jobs]
    done = [r for r in rows if r["status"] == "done"]
    for row in done:  # each against the job of its own series without model parallelism, never another model's
        row["model_parallel"] = row["tp"] * row["pp"]
        base = next((r for r in done if r["series"] == row["series"] and r["tp"] == r["pp"] == 1), None)
        if base is None:
            continue
        paper_tp = row["tp"] if row["pp"] == 1 else None  # the 2019 paper's numbers are for TP alone
        if mode == "weak":
            row["efficiency"] = row["tflops_per_device"] / base["tflops_per_device"]
            row["paper_efficiency"] = PAPER_WEAK_EFFICIENCY.get(paper_tp)
        else:
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["paper_speedup"] = PAPER_STRONG_SPEEDUP.get(paper_tp)
    return rows


COLUMNS = ["job", "series", "model", "tp", "pp", "virtual_stages", "schedule", "dp", "status", "tokens_per_s",
           "tflops_per_device", "mfu", "efficiency", "paper_efficiency",
           "speedup", "paper_speedup", "final_valid_loss", "error"]  # fmt: skip


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_outputs(rows: list[dict], sweep: Path, mode: str) -> list[Path]:
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    with open(sweep / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (sweep / "scaling.md").write_text("\n".join(table) + "\n")

    done = sorted((r for r in rows if r["status"] == "done"), key=lambda r: (r["model_parallel"], r["pp"]))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['model']}\ntp={r['tp']}" + (f" pp={r['pp']}" if r["pp"] > 1 else "") for r in done]
    left.bar(labels, [r["tflops_per_device"] for r in done])
    left.set_ylabel("TFLOP/s per device")
    left.set_title("throughput per device")
    key, paper = ("efficiency", PAPER_WEAK_EFFICIENCY) if mode == "weak" else ("speedup", PAPER_STRONG_SPEEDUP)
    for series in dict.fromkeys(r["series"] for r in done):
        for pp in sorted({r["pp"] for r in done if r["series"] == series}):
            # each pipeline depth's curve over the TP degree, starting from the series' base (TP = PP = 1)
            points = [r for r in done if r["series"] == series and r.get(key) is not None]
            points = [r for r in points if r["pp"] == pp or r["model_parallel"] == 1]
            label = f"{series}, pp={pp} (this sweep)" if pp > 1 else f"{series} (this sweep)"
            right.plot([r["model_parallel"] for r in points], [r[key] for r in points], "o-", label=label)
    right.plot(list(paper), list(paper.values()), "s--", label="paper, TP alone (Shoeybi et al. 2019)")
    right.set_xlabel("model-parallel degree (tp x pp)")
    right.set_ylabel(f"{mode} scaling {key}")
    right.set_title(f"{mode} scaling against TP = PP = 1")
    right.legend()
    figure.tight_layout()
    figure.savefig(sweep / "scaling.png", dpi=100)
    plt.close(figure)
    return [sweep / "scaling.md", sweep / "scaling.csv", sweep / "scaling.png"]


def publish_to_wandb(cfg: AnalyzeConfig, rows: list[dict], sweep: Path) -> None:
    """The table and the plot as one W&B run in the sweep's group (a failure is a warning, the files remain)."""
    if cfg.wandb_mode == "disabled":
        return
    try:
        import wandb

        columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
        values = {
            "scaling": wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows]),
            "scaling_plot": wandb.Image(str(sweep / "scaling.png")),
        }
    except Exception as error:
        log.warning("W&B is not available (%s); the table and plot are in %s", error, sweep)
        return
    group = next((yaml.safe_load((sweep / r["job"] / "config.yaml").read_text())["logger"]["group"]
                  for r in rows if r["status"] == "done"), None)  # fmt: skip
    settings = {"console": "off", "quiet": True, "x_disable_stats": True, "disable_git": True}
    kwargs = {"project": cfg.project, "group": group, "job_type": "analysis", "name": f"analysis-{sweep.name}",
              "dir": str(sweep), "mode": cfg.wandb_mode, "settings": settings}  # fmt: skip
    publish(kwargs, values)


def report(cfg: AnalyzeConfig) -> None:
    check_ranges(cfg)
    sweep = Path(cfg.sweep)
    if not sweep.is_dir():
        raise ConfigError(f"sweep={sweep} is not a directory: give a multirun directory")
    rows = analyze(sweep, cfg.mode)
    outputs = write_outputs(rows, sweep, cfg.mode)
    publish_to_wandb(cfg, rows, sweep)
    print((sweep / "scaling.md").read_text())
    log.info("wrote %s", ", ".join(map(str, outputs)))


@entry.hydra_app("analyze")
def main(raw: DictConfig) -> None:
    entry.run_here(raw, AnalyzeConfig, report)


if __name__ == "__main__":
    main()
