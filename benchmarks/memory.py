"""CPU memory benchmark: each rank's measured step peak next to the planner's prediction, for every memory option.

    python benchmarks/memory.py            # the full table at the CPU benchmark's shape (4.4 min on the idle 2 cores)
    python benchmarks/memory.py --quick    # a smoke run (seconds), as the test suite does

The shape is benchmarks/cpu_training.py's (FULL: h=512, 6 layers, 16,384 vocabulary, seq 256, micro batch 8), with
the framework's default dropout (0.1), so that on CPU, where the fused attention has no dropout and the math path
keeps the s x s scores, selective recomputation has something to free. Each row is one resolved Config, run in
fresh gloo processes (cores / ranks threads each) and handed to the planner as it is:

- parallel.recompute = none | selective | full, at tp=1;
- parallel.sequence_parallel at tp=2, against tp=2 without it;
- parallel.distributed_optimizer at dp=2, against the plain optimizer at dp=2.

Each rank trains GPTModel with the framework's own step (forward and backward, GradientSync, then optimizer_step or
DistributedOptimizer.step) and reports: its step peak (megatron_exp.plan.measure_step_peak_bytes: weights and
Adam's state, the distributed optimizer's flat gradient buffer too, as they stay resident between steps ("weights
+ Adam"), plus what one step allocates, every storage tracked; deterministic), plan.estimate's per-rank peak
for the same Config and their ratio, the bytes autograd keeps for backward (plan.measure_activation_bytes), Adam's
moments, and the median time of untracked steps (the tracking dispatch mode slows a step). The rows run in turn,
`repeats` times, so that each sees the same machine state; memory is measured in the first round only.
Prints a markdown table and writes JSON (default outputs/benchmarks/memory.json).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from cpu_training import FULL, QUICK, _batch, _model_config  # noqa: E402  (benchmarks/, this script's directory)

from megatron_exp import preflight  # noqa: E402
from megatron_exp.config import Config, DataConfig, HardwareConfig, ParallelConfig  # noqa: E402
from megatron_exp.hardware import keep_freed_cpu_memory  # noqa: E402
from megatron_exp.models.gpt import GPTModel  # noqa: E402
from megatron_exp.parallel import random, state  # noqa: E402
from megatron_exp.plan import estimate, measure_activation_bytes, measure_step_peak_bytes  # noqa: E402
from megatron_exp.training.distributed_optimizer import MOMENTS, DistributedOptimizer  # noqa: E402
from megatron_exp.training.grad_sync import GradientSync  # noqa: E402
from megatron_exp.training.optim import build_optimizer, optimizer_step  # noqa: E402

# (row name, the parallel options it sets); each pair of rows after the first three differs in one option
OPTIONS = [
    ("recompute=none", {}),
    ("recompute=selective", {"recompute": "selective"}),
    ("recompute=full", {"recompute": "full"}),
    ("tp=2", {"tp": 2}),
    ("tp=2, sequence_parallel", {"tp": 2, "sequence_parallel": True}),
    ("dp=2, plain optimizer", {"dp": 2}),
    ("dp=2, distributed_optimizer", {"dp": 2, "distributed_optimizer": True}),
]
DROPOUT = 0.1
SIZES = ("resident_bytes", "adam_bytes", "saved_bytes", "peak_bytes", "predicted_bytes")  # the table's MB columns


def benchmark_config(shape: dict, options: dict) -> Config:
    """The resolved Config of one row: what its workers train and what the planner is asked about."""
    model = dataclasses.replace(_model_config(shape), hidden_dropout=DROPOUT, attention_dropout=DROPOUT)
    composed = Config(
        model=model,
        parallel=ParallelConfig(micro_batch=shape["batch"], **options),
        data=DataConfig(seq_len=shape["seq_len"]),
        hardware=HardwareConfig(name="cpu", device="cpu", precision="fp32"),
    )
    cfg = preflight.resolve(composed, measure_peak=False)
    cfg.model.validate(cfg.parallel.tp)
    return cfg


class Trainer:
    """One rank's training step as the training loop runs it, with the tensors that stay resident between steps."""

    def __init__(self, cfg: Config, grid: state.ProcessGrid, tokens: torch.Tensor):
        par = cfg.parallel
        self.model = GPTModel(cfg.model, recompute=par.recompute, sequence_parallel=par.sequence_parallel)
        self.tokens, self.clip = tokens, cfg.optimizer.clip_grad
        self.parameters = list(self.model.parameters())
        if par.distributed_optimizer:
            self.optimizer = DistributedOptimizer(self.model, cfg.optimizer, grid)
            self.sync = GradientSync(self.model, grid, flat=self.optimizer.grads)
            self.update = lambda: self.optimizer.step(self.clip)
            self.adam, self.flat_grads = self.optimizer.optimizer, [self.optimizer.grads]
        else:
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
            self.sync = GradientSync(self.model, grid)
            self.update = lambda: optimizer_step(self.optimizer, self.parameters, self.clip, grid)
            self.adam, self.flat_grads = self.optimizer, []

    def backward(self) -> None:
        self.model.loss(self.model(self.tokens[:, :-1]), self.tokens[:, 1:]).backward()

    def step(self, backward=None) -> None:
        (backward or self.backward)()
        self.sync()
        self.update()

    def moments(self) -> list[torch.Tensor]:
        return [s[k] for s in self.adam.state.values() for k in MOMENTS]

    def resident(self) -> list[torch.Tensor]:
        """Weights, Adam's moments and the distributed optimizer's gradient buffer (after a first step)."""
        return [*self.parameters, *self.flat_grads, *self.moments()]


def _nbytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _worker(rank, world, init_file, cfg, shape, measure_memory, out_dir):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the same total cores in every row
    keep_freed_cpu_memory()  # as the framework's CPU workers do
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grid = state.initialize(cfg.parallel.tp)
    random.seed(0, grid.tp.rank)
    trainer = Trainer(cfg, grid, _batch(shape))
    trainer.step()  # warm-up; Adam's state is made
    result = {"rank": rank}
    if measure_memory:
        saved = []
        trainer.step(lambda: saved.append(measure_activation_bytes(trainer.model, trainer.tokens)))
        result |= {"saved_bytes": saved[0], "adam_bytes": _nbytes(trainer.moments())}
        result |= {"resident_bytes": _nbytes(trainer.resident())}
        result["peak_bytes"] = measure_step_peak_bytes(trainer.step, trainer.resident())
    seconds = []
    for _ in range(shape["steps"]):
        dist.barrier()  # every rank starts the step together
        start = time.perf_counter()
        trainer.step()
        seconds.append(time.perf_counter() - start)
    torch.save(result | {"s": statistics.median(seconds)}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    state.destroy()


def run_option(cfg: Config, shape: dict, measure_memory: bool) -> list[dict]:
    """One fresh group of tp x dp processes; every rank's measurements."""
    world = cfg.parallel.tp * cfg.parallel.dp
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, f"{tmp}/rendezvous", cfg, shape, measure_memory, tmp)
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{rank}.pt") for rank in range(world)]


def measure(shape: dict, repeats: int) -> list[dict]:
    configs = {name: benchmark_config(shape, options) for name, options in OPTIONS}
    runs: dict[str, list[list[dict]]] = {name: [] for name in configs}
    for repeat in range(repeats):
        for name, cfg in configs.items():
            runs[name].append(run_option(cfg, shape, measure_memory=repeat == 0))
    rows = []
    for name, cfg in configs.items():
        predicted = estimate(cfg)["total_gb"] * 1e9  # every rank's: one stage, identical shards
        ranks = []
        for memory, *later in zip(*runs[name], strict=True):  # one rank's runs, the first with memory
            seconds = [memory["s"], *(r["s"] for r in later)]
            ranks.append(memory | {"s": statistics.median(seconds), "predicted_bytes": predicted,
                                   "predicted_vs_measured": predicted / memory["peak_bytes"]})  # fmt: skip
        par = cfg.parallel
        rows.append({"option": name, "tp": par.tp, "dp": par.dp, "recompute": par.recompute, "ranks": ranks})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| option | rank | weights + Adam | Adam moments | saved for backward | step peak (measured) | planner "
        "| planner / measured | step time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["ranks"]:
            cells = [row["option"], str(r["rank"]), *(f"{r[key] / 1e6:.1f} MB" for key in SIZES)]
            cells += [f"{r['predicted_vs_measured']:.3f}", f"{r['s'] * 1e3:.0f} ms"]
            lines.append(f"| {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape and one round, for a smoke test")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the rows in turn (times: the median)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "memory.json"))
    args = parser.parse_args()
    shape = {k: v for k, v in (QUICK if args.quick else FULL).items() if k != "repeats"} | {"steps": args.steps}
    repeats = 1 if args.quick else args.repeats
    rows = measure(shape, repeats)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "shape": shape,
        "repeats": repeats,
        "dropout": DROPOUT,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{results['command']}  ({results['date']}, {results['machine']})")
    print(f"shape: {shape}, dropout {DROPOUT}, fp32; step time: median of {args.steps} steps x {repeats} rounds")
    print("\n".join(table(rows)))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
