"""CPU benchmark of the distributed optimizer at dp=2: ours against torch's ZeroRedundancyOptimizer and the plain
optimizer, on the same GPT and batches.

    python benchmarks/distributed_optimizer.py          # the table (a minute or two on 2 cores)
    python benchmarks/distributed_optimizer.py --quick  # a smoke run (seconds)

Each variant runs in two fresh gloo processes (cores / 2 threads each), in turn, `repeats` times:

- plain: GradientSync's bucketed all-reduce, fused AdamW on every parameter (training/optim.py);
- zero: the same all-reduce, then torch.distributed.optim.ZeroRedundancyOptimizer (fused AdamW on the
  parameters it assigned this rank, whole parameters greedily by size, then a broadcast of each rank's);
- ours: reduce-scatter of the flat gradient buffer, fused AdamW on this rank's slice, all-gather
  (training/distributed_optimizer.py).

Reported per variant: the median step time (each rank's backward and update; the barrier between them, where the
faster rank waits for the slower, left out), the part after backward (gradient reduction, clipping and the
update, where the variants differ), Adam's state on the fullest rank against an even 1/dp, and the final loss
(all three train the same model, so the losses agree to fp32 rounding). Prints a markdown table and writes JSON.
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
from torch.distributed.optim import ZeroRedundancyOptimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_exp.config import ModelConfig, OptimizerConfig  # noqa: E402
from megatron_exp.hardware import keep_freed_cpu_memory  # noqa: E402
from megatron_exp.models.contract import Batch  # noqa: E402
from megatron_exp.models.gpt import GPTModel  # noqa: E402
from megatron_exp.parallel import random, state  # noqa: E402
from megatron_exp.training.distributed_optimizer import MOMENTS, DistributedOptimizer  # noqa: E402
from megatron_exp.training.grad_sync import GradientSync  # noqa: E402
from megatron_exp.training.optim import build_optimizer, clip_gradients_, decayed, optimizer_step  # noqa: E402
from megatron_exp.training.schedule import MicroBatches  # noqa: E402

FULL = dict(hidden=256, heads=8, layers=4, vocab_size=8192, seq_len=128, micro_batch=4, micro_batches=2, steps=5)
QUICK = dict(hidden=64, heads=4, layers=2, vocab_size=512, seq_len=32, micro_batch=2, micro_batches=2, steps=2)
VARIANTS = ("plain", "zero", "ours")
DP = 2
SETTINGS = OptimizerConfig(lr=1e-4)


def _batches(shape: dict, rank: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(rank)
    size = (shape["micro_batch"], shape["seq_len"] + 1)
    samples = [torch.randint(0, shape["vocab_size"], size, generator=generator) for _ in range(shape["micro_batches"])]
    return [Batch({"tokens": s[:, :-1]}, {"targets": s[:, 1:]}) for s in samples]


def _updater(variant: str, model: GPTModel, grid: state.ProcessGrid):
    """(the step after backward, the numbers of Adam state elements this rank keeps)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if variant == "ours":
        optimizer = DistributedOptimizer(model, SETTINGS, grid)
        sync = GradientSync(model, grid, flat=optimizer.grads)
        return lambda: (sync(), optimizer.step(1.0)), lambda: sum(
            optimizer.optimizer.state[p][k].numel() for p in optimizer.main for k in MOMENTS
        )
    sync = GradientSync(model, grid)
    if variant == "plain":
        optimizer = build_optimizer(model, SETTINGS)
        return lambda: (sync(), optimizer_step(optimizer, parameters, 1.0, grid)), lambda: sum(
            optimizer.state[p][k].numel() for p in parameters for k in MOMENTS
        )
    groups = [
        {"params": [p for p in parameters if decayed(p)], "weight_decay": SETTINGS.weight_decay},
        {"params": [p for p in parameters if not decayed(p)], "weight_decay": 0.0},
    ]
    zero = ZeroRedundancyOptimizer(
        groups, torch.optim.AdamW, process_group=grid.dp.handle, parameters_as_bucket_view=True, lr=SETTINGS.lr,
        betas=(SETTINGS.beta1, SETTINGS.beta2), eps=SETTINGS.eps, fused=True,
    )  # fmt: skip

    def step():
        sync()
        clip_gradients_(parameters, 1.0, grid)  # every rank holds the whole averaged gradient
        zero.step()
        zero.zero_grad(set_to_none=True)

    return step, lambda: sum(s[k].numel() for s in zero.optim.state.values() for k in MOMENTS)


def _worker(rank, init_file, shape, variant, out_file):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // DP))
    keep_freed_cpu_memory()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=DP)
    grid = state.initialize(1)  # one TP rank: the processes are DP replicas
    random.seed(0, 0)
    keys = ("hidden", "heads", "layers", "vocab_size", "seq_len")
    cfg = ModelConfig(name="bench", hidden_dropout=0.0, attention_dropout=0.0, **{k: shape[k] for k in keys})
    model = GPTModel(cfg, seed=0)
    schedule = MicroBatches(model, contextlib.nullcontext)
    update, kept = _updater(variant, model, grid)
    batches = _batches(shape, grid.dp.rank)
    schedule.train(batches)
    update()  # warm-up (and Adam's state allocated)
    dist.barrier()
    total = after_backward = 0.0
    for _ in range(shape["steps"]):
        start = time.perf_counter()
        terms = schedule.train(batches)
        backward = time.perf_counter() - start
        dist.barrier()  # the update's time without waiting for the slower rank's backward
        middle = time.perf_counter()
        update()
        dist.barrier()
        after = time.perf_counter() - middle
        total, after_backward = total + backward + after, after_backward + after
    numbers = torch.tensor([total, after_backward, kept(), terms["loss"].item()], dtype=torch.float64)
    gathered = [torch.zeros_like(numbers) for _ in range(DP)]
    dist.all_gather(gathered, numbers)
    if rank == 0:
        per_step = [(g[0].item() / shape["steps"], g[1].item() / shape["steps"]) for g in gathered]
        result = {"s": max(s for s, _ in per_step), "update_s": max(u for _, u in per_step)}
        result |= {"kept": [int(g[2].item()) for g in gathered], "loss": statistics.mean(g[3].item() for g in gathered)}
        torch.save(result | {"parameters": sum(p.numel() for p in model.parameters())}, out_file)
    dist.barrier()
    state.destroy()


def run_variant(shape: dict, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        mp.start_processes(_worker, args=(f"{tmp}/rendezvous", shape, variant, out), nprocs=DP, start_method="spawn")
        return torch.load(out)


def measure(shape: dict, repeats: int) -> list[dict]:
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            runs[variant].append(run_variant(shape, variant))
    rows = []
    for variant, results in runs.items():
        first = results[0]
        even = 2 * first["parameters"] / DP
        rows.append({"variant": variant, "s": statistics.median(r["s"] for r in results),
                     "update_s": statistics.median(r["update_s"] for r in results),
                     "adam_elements_per_rank": first["kept"], "fullest_vs_even": max(first["kept"]) / even,
                     "loss": first["loss"]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "distributed_optimizer.json"))
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    rows = measure(shape, 1 if args.quick else args.repeats)
    print(f"dp={DP} on {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"shape: {shape}")
    print("| variant | step | after backward | Adam state, fullest rank / even 1/dp | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {1e3 * r['s']:.0f} ms | {1e3 * r['update_s']:.1f} ms | "
              f"{r['fullest_vs_even']:.2f} | {r['loss']:.6f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": str(date.today()), "shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
