"""CPU pipeline benchmark: the training step at pp = 1, 2, 4 (1F1B and interleaved), measured against the bubble.

    python benchmarks/pipeline.py            # the full table (a few minutes on 2 cores)
    python benchmarks/pipeline.py --quick    # a smoke run (seconds), as the test suite does

Each layout runs in fresh gloo processes, the machine's cores split fairly among the stages (cores / pp threads
each, at least one), with the same global batch of m micro-batches. Two measurements per layout:

- the step time, next to the prediction of a perfect split: T(pp=1) x (1 + bubble), bubble = (p - 1) / (v m)
  (megatron_exp.parallel.pipeline.bubble_fraction); beyond the core count, stages also share cores;
- each stage's idle fraction: the time its blocking receives waited (for an activation or a gradient) over the
  step time, the measured bubble.

Prints a markdown table and writes it as JSON (default outputs/benchmarks/pipeline.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_exp.config import ModelConfig, OptimizerConfig  # noqa: E402
from megatron_exp.hardware import keep_freed_cpu_memory  # noqa: E402
from megatron_exp.models.contract import Batch  # noqa: E402
from megatron_exp.models.gpt import GPTModel  # noqa: E402
from megatron_exp.parallel import random, state  # noqa: E402
from megatron_exp.parallel.pipeline import PipelineLayout, bubble_fraction  # noqa: E402
from megatron_exp.training.grad_sync import GradientSync  # noqa: E402
from megatron_exp.training.optim import build_optimizer, optimizer_step  # noqa: E402
from megatron_exp.training.schedule import MicroBatches, Pipeline  # noqa: E402

# 8 layers of 256 (every pp x virtual up to 4 x 2 cuts them evenly), seq 128, 8 micro-batches of 4.
FULL = dict(hidden=256, heads=8, layers=8, vocab_size=4096, seq_len=128, micro_batch=4, micro_batches=8, steps=4)
QUICK = dict(hidden=64, heads=4, layers=4, vocab_size=512, seq_len=32, micro_batch=2, micro_batches=4, steps=2)
LAYOUTS = [(1, 1, "1f1b"), (2, 1, "1f1b"), (2, 2, "interleaved"), (4, 1, "1f1b"), (4, 1, "gpipe")]
QUICK_LAYOUTS = [(1, 1, "1f1b"), (2, 1, "1f1b"), (2, 2, "interleaved")]


class TimedPipeline(Pipeline):
    """The framework's pipeline stage, with the time its blocking receives wait added up."""

    waited = 0.0

    def _receive(self, like, chunk, forward):
        start = time.perf_counter()
        buffer = super()._receive(like, chunk, forward)
        self.waited += time.perf_counter() - start
        return buffer


def _batches(shape: dict) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    size = (shape["micro_batch"], shape["seq_len"] + 1)
    samples = [torch.randint(0, shape["vocab_size"], size, generator=generator) for _ in range(shape["micro_batches"])]
    return [Batch({"tokens": s[:, :-1]}, {"targets": s[:, 1:]}) for s in samples]


def _worker(rank, world, init_file, shape, virtual, schedule, out_file):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the same total cores at every degree
    keep_freed_cpu_memory()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grid = state.initialize(1, world)
    random.seed(0, 0, stage=grid.pp.rank)
    keys = ("hidden", "heads", "layers", "vocab_size", "seq_len")
    cfg = ModelConfig(name="bench", hidden_dropout=0.0, attention_dropout=0.0, **{k: shape[k] for k in keys})
    layout = PipelineLayout(world, virtual, cfg.layers)
    model = GPTModel(cfg, part=layout.part(grid.pp.rank))
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    parameters = [p for p in model.parameters() if p.requires_grad]
    sync = GradientSync(model, grid)
    if world == 1:
        schedule_runner = MicroBatches(model, contextlib.nullcontext)
    else:
        schedule_runner = TimedPipeline(model, grid, layout, schedule, contextlib.nullcontext)
    batches = _batches(shape)

    def step():
        schedule_runner.train(batches)
        sync()
        optimizer_step(optimizer, parameters, 1.0, grid)

    step()  # warm-up
    dist.barrier()
    schedule_runner.waited = 0.0
    start = time.perf_counter()
    for _ in range(shape["steps"]):
        step()
    dist.barrier()
    seconds = (time.perf_counter() - start) / shape["steps"]
    idle = torch.tensor([schedule_runner.waited / shape["steps"] / seconds])
    idles = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(idles, idle)
    if rank == 0:
        torch.save({"s": seconds, "idle": [float(t) for t in idles]}, out_file)
    dist.barrier()
    state.destroy()


def run_layout(shape: dict, pp: int, virtual: int, schedule: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        args = (pp, f"{tmp}/rendezvous", shape, virtual, schedule, out)
        mp.start_processes(_worker, args=args, nprocs=pp, start_method="spawn")
        return torch.load(out)


def measure(shape: dict, layouts: list[tuple[int, int, str]], repeats: int) -> list[dict]:
    """Every layout `repeats` times in turn (so all see the same machine state); medians."""
    runs: dict[tuple, list[dict]] = {layout: [] for layout in layouts}
    for _ in range(repeats):
        for layout in layouts:
            runs[layout].append(run_layout(shape, *layout))
    base = statistics.median(r["s"] for r in runs[layouts[0]])
    rows = []
    for (pp, virtual, schedule), results in runs.items():
        bubble = bubble_fraction(pp, virtual, shape["micro_batches"])
        seconds = statistics.median(r["s"] for r in results)
        idle = [statistics.median(r["idle"][stage] for r in results) for stage in range(pp)]
        rows.append({"pp": pp, "virtual": virtual, "schedule": schedule, "s": seconds, "bubble": bubble,
                     "predicted_s": base * (1 + bubble), "idle_per_stage": idle})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each layout (default 3; quick 1)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "pipeline.json"))
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    rows = measure(shape, QUICK_LAYOUTS if args.quick else LAYOUTS, repeats)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "shape": shape,
        "repeats": repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    lines = [
        f"CPU pipeline step (h={shape['hidden']}, L={shape['layers']}, V={shape['vocab_size']}, seq "
        f"{shape['seq_len']}, {shape['micro_batches']} micro-batches of {shape['micro_batch']}), fp32, gloo; "
        f"{results['machine']}; {results['date']}; medians of {repeats}",
        f"command: {results['command']}",
        "",
        "| pp | virtual | schedule | step | predicted T(1) x (1 + bubble) | measured / predicted | analytic bubble "
        "| idle per stage (measured) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        idle = ", ".join(f"{100 * f:.0f}%" for f in r["idle_per_stage"])
        lines.append(
            f"| {r['pp']} | {r['virtual']} | {r['schedule']} | {r['s'] * 1e3:.0f} ms | {r['predicted_s'] * 1e3:.0f} "
            f"ms | {r['s'] / r['predicted_s']:.2f} | {100 * r['bubble']:.1f}% | {idle} |"
        )
    print("\n".join(lines))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
