"""CPU training-step benchmark: this framework against a plain PyTorch GPT, TP scaling, recomputation
(parallel.recompute), torch.compile.

    python benchmarks/cpu_training.py            # the full table (a few minutes on 2 cores)
    python benchmarks/cpu_training.py --quick    # a smoke run (seconds), as the test suite does

Prints a markdown table and writes it as JSON (default outputs/benchmarks/cpu_training.json). Every number is
measured in this one run on this machine, with the plain model and the framework timed in alternation so that
both see the same machine state; the fp32 matmul ceiling of the CPU is measured here too, and MFU is stated
against it. Model FLOPs use megatron_exp.training.flops (full s^2 attention).
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_exp.config import RECOMPUTE_MODES, ModelConfig, OptimizerConfig  # noqa: E402
from megatron_exp.hardware import keep_freed_cpu_memory, measure_cpu_matmul_tflops  # noqa: E402
from megatron_exp.models.gpt import GPTModel  # noqa: E402
from megatron_exp.parallel import random, state  # noqa: E402
from megatron_exp.plan import measure_activation_bytes  # noqa: E402
from megatron_exp.training.flops import model_flops  # noqa: E402
from megatron_exp.training.optim import build_optimizer, clip_gradients_  # noqa: E402

# ~25M parameters: 6 layers of 512, a 16,384-entry vocabulary; seq 256, micro batch 8 (the target shape).
FULL = dict(hidden=512, heads=8, layers=6, vocab_size=16384, seq_len=256, batch=8, steps=6, repeats=3)
QUICK = dict(hidden=64, heads=4, layers=2, vocab_size=512, seq_len=32, batch=2, steps=2, repeats=1)  # one round


class PlainBlock(nn.Module):
    def __init__(self, h: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    """The same GPT written the ordinary single-device way: nn.Linear, SDPA, tied head, F.cross_entropy."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden))
        self.blocks = nn.ModuleList(PlainBlock(cfg.hidden, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    @torch.no_grad()
    def copy_from(self, framework: GPTModel) -> None:
        """Take the framework model's weights (the fused QKV reordered from head-by-head to [q | k | v])."""
        ours = framework.state_dict()
        self.embedding.weight.copy_(ours["embedding.weight"][: self.embedding.num_embeddings])
        self.position.copy_(ours["position_embedding"])
        self.norm.load_state_dict({"weight": ours["final_norm.weight"], "bias": ours["final_norm.bias"]})
        names = {
            "ln1": "attention_norm",
            "proj": "attention.proj",
            "ln2": "mlp_norm",
            "fc1": "mlp.fc1",
            "fc2": "mlp.fc2",
        }
        for i, block in enumerate(self.blocks):
            for mine, theirs in names.items():
                getattr(block, mine).weight.copy_(ours[f"layers.{i}.{theirs}.weight"])
                getattr(block, mine).bias.copy_(ours[f"layers.{i}.{theirs}.bias"])
            for kind in ("weight", "bias"):
                fused = ours[f"layers.{i}.attention.qkv.{kind}"]
                by_head = fused.reshape(block.heads, 3, -1, *fused.shape[1:])
                getattr(block.qkv, kind).copy_(by_head.transpose(0, 1).reshape(fused.shape))

    def loss(self, tokens):
        x = self.embedding(tokens[:, :-1]) + self.position[: tokens.shape[1] - 1]
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.norm(x), self.embedding.weight)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _model_config(shape: dict) -> ModelConfig:
    keys = ("hidden", "heads", "layers", "vocab_size", "seq_len")
    return ModelConfig(name="bench", hidden_dropout=0.0, attention_dropout=0.0, **{k: shape[k] for k in keys})


def _step_plain(model, optimizer, tokens):
    model.loss(tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step_framework(model, optimizer, tokens, grid):
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    clip_gradients_(list(model.parameters()), 1.0, grid)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _seconds_per_step(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _batch(shape: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"] + 1), generator=generator)


def compare_with_plain(shape: dict) -> dict:
    """Alternate framework TP=1 and plain GPT timings; the ratio per pair, its median and spread."""
    cfg, tokens = _model_config(shape), _batch(shape)
    random.seed(0, 0)
    framework = GPTModel(cfg)
    framework_opt = build_optimizer(framework, OptimizerConfig(lr=1e-4))
    plain = PlainGPT(cfg)
    plain.copy_from(framework)  # the same weights, so both run the same arithmetic on the same numbers
    same_loss = (plain.loss(tokens).item(), framework.loss(framework(tokens[:, :-1]), tokens[:, 1:]).item())
    assert abs(same_loss[0] - same_loss[1]) < 1e-4, f"the two models differ: losses {same_loss}"
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    ratios, plain_times, framework_times = [], [], []
    for _ in range(shape["repeats"]):
        p = _seconds_per_step(lambda: _step_plain(plain, plain_opt, tokens), shape["steps"])
        f = _seconds_per_step(lambda: _step_framework(framework, framework_opt, tokens, state.SERIAL), shape["steps"])
        plain_times.append(p)
        framework_times.append(f)
        ratios.append(p / f)  # > 1: the framework is faster
    return {"plain_s": statistics.median(plain_times), "framework_s": statistics.median(framework_times),
            "speed_ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip


def recomputation(shape: dict) -> dict:
    """Step time and peak memory for each parallel.recompute mode (fresh TP=1 processes, alternating; medians, as
    the peak moves by ~10% from process to process), and the bytes autograd keeps for backward."""
    cfg, tokens = _model_config(shape), _batch(shape)
    runs = {mode: [] for mode in RECOMPUTE_MODES}
    for _ in range(shape["repeats"]):
        for recompute in runs:
            runs[recompute].append(_run_workers(shape, 1, recompute=recompute))
    rows = {}
    for recompute, results in runs.items():
        random.seed(0, 0)
        saved = measure_activation_bytes(GPTModel(cfg, recompute=recompute), tokens)
        peaks_mb = [r["peak_bytes"] / 1e6 for r in results]
        rows[recompute] = {
            "s": statistics.median(r["s"] for r in results),
            "peak_mb": statistics.median(peaks_mb),
            "peak_mb_range": [min(peaks_mb), max(peaks_mb)],
            "activation_mb": saved / 1e6,
        }
    return rows


def compiled_layers(shape: dict) -> dict:
    """Framework TP=1 steps with each layer under torch.compile (train.compile=true) against eager, alternating."""
    cfg, tokens = _model_config(shape), _batch(shape)
    random.seed(0, 0)
    models = {"eager": GPTModel(cfg, seed=1), "compiled": GPTModel(cfg, seed=1)}
    models["compiled"].compile_layers()
    optimizers = {name: build_optimizer(m, OptimizerConfig(lr=1e-4)) for name, m in models.items()}
    times = {name: [] for name in models}
    for _ in range(shape["repeats"]):
        for name, model in models.items():
            step = lambda m=model, o=optimizers[name]: _step_framework(m, o, tokens, state.SERIAL)  # noqa: E731
            times[name].append(_seconds_per_step(step, shape["steps"]))
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled}


def _memory_status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its high-water mark, this process's own: ru_maxrss would count the
    spawning parent's size too) in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _tp_worker(rank, world, init_file, shape, out_file, keep_freed=True, recompute="none"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the same total cores at every TP degree
    if keep_freed:  # as the framework's CPU workers do; otherwise glibc's defaults
        keep_freed_cpu_memory()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grid = state.initialize(world)
    random.seed(0, grid.tp.rank)
    cfg, tokens = _model_config(shape), _batch(shape)
    model = GPTModel(cfg, recompute=recompute)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    weights = _memory_status("VmRSS")
    seconds = _seconds_per_step(lambda: _step_framework(model, optimizer, tokens, grid), shape["steps"])
    # the high-water mark of resident memory, above the weights: gradients, Adam's moments and the step's peak
    peak = _memory_status("VmHWM") - weights
    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    _step_framework(model, optimizer, tokens, grid)
    dist.all_reduce = original
    if rank == 0:
        torch.save({"s": seconds, "all_reduces": len(calls), "bytes": sum(calls), "peak_bytes": peak}, out_file)
    dist.barrier()
    state.destroy()


def analytic_all_reduces(shape: dict) -> tuple[int, int]:
    """Per training step at TP > 1: f/g per layer (2 forward + 2 backward), embedding g, output-layer f,
    the loss's 2 (max; target logit and sum of exponentials), and the grad-norm scalar."""
    b, s, h, layers = shape["batch"], shape["seq_len"], shape["hidden"], shape["layers"]
    activation = b * s * h * 4
    count = 4 * layers + 1 + 1 + 2 + 1
    total = (4 * layers + 2) * activation + b * s * 4 + 2 * b * s * 4 + 4
    return count, total


def _run_workers(shape: dict, tp: int, keep_freed: bool = True, recompute: str = "none") -> dict:
    """One fresh group of `tp` processes timing the framework's step; rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pt"
        args = (tp, f"{tmp}/rendezvous", shape, out, keep_freed, recompute)
        mp.start_processes(_tp_worker, args=args, nprocs=tp, start_method="spawn")
        return torch.load(out)


def allocator(shape: dict) -> dict:
    """Framework TP=1 steps in fresh processes with glibc's default allocator settings and with the framework's
    (keep_freed_cpu_memory), alternating."""
    times = {"default": [], "keep_freed": []}
    for _ in range(shape["repeats"]):
        for name in times:
            times[name].append(_run_workers(shape, 1, keep_freed=name == "keep_freed")["s"])
    default, keep = statistics.median(times["default"]), statistics.median(times["keep_freed"])
    return {"default_s": default, "keep_freed_s": keep, "speedup": default / keep}


def tp_scaling(shape: dict, degrees: list[int]) -> dict:
    rows = {tp: _run_workers(shape, tp) for tp in degrees}
    base = rows[degrees[0]]["s"]
    for row in rows.values():
        row["efficiency"] = base / row["s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for a smoke test")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "cpu_training.json"))
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    torch.set_num_threads(os.cpu_count() or 1)
    keep_freed_cpu_memory()  # the framework's CPU workers run this way; the plain model shares the process

    ceiling = measure_cpu_matmul_tflops(size=256 if args.quick else 2048, seconds=0.2 if args.quick else 2.0)
    cfg = _model_config(shape)
    parameters = sum(p.numel() for p in GPTModel(cfg).parameters())
    flops = model_flops(shape["batch"], shape["seq_len"], shape["layers"], shape["hidden"], cfg.vocab_size)
    plain = compare_with_plain(shape)
    recompute = recomputation(shape)
    compiled = compiled_layers(shape)
    memory = allocator(shape)
    scaling = tp_scaling(shape, [1, 2] if args.quick else [1, 2, 4])
    expected_count, expected_bytes = analytic_all_reduces(shape)

    def mfu(seconds):
        return flops / seconds / (ceiling * 1e12)

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "date": date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "shape": shape,
        "parameters": parameters,
        "matmul_ceiling_tflops": ceiling,
        "plain_vs_framework": plain,
        "framework_mfu_of_ceiling": mfu(plain["framework_s"]),
        "plain_mfu_of_ceiling": mfu(plain["plain_s"]),
        "recompute": recompute,
        "compile": compiled,
        "allocator": memory,
        "tp_scaling": {str(k): v for k, v in scaling.items()},
        "analytic_all_reduces_per_step": {"count": expected_count, "bytes": expected_bytes},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    tokens = shape["batch"] * shape["seq_len"]
    lines = [
        f"CPU training step, {parameters / 1e6:.1f}M parameters (h={shape['hidden']}, L={shape['layers']}, "
        f"V={shape['vocab_size']}, seq {shape['seq_len']}, micro batch {shape['batch']}), fp32; "
        f"{results['machine']}; {results['date']}",
        f"command: {results['command']}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| fp32 matmul ceiling (measured) | {ceiling * 1e3:.0f} GFLOP/s |",
        f"| plain PyTorch GPT step | {plain['plain_s'] * 1e3:.0f} ms ({tokens / plain['plain_s']:.0f} tok/s, "
        f"MFU {100 * results['plain_mfu_of_ceiling']:.0f}% of ceiling) |",
        f"| framework TP=1 step | {plain['framework_s'] * 1e3:.0f} ms ({tokens / plain['framework_s']:.0f} tok/s, "
        f"MFU {100 * results['framework_mfu_of_ceiling']:.0f}% of ceiling) |",
        f"| framework / plain throughput | {plain['speed_ratio']:.3f}x (min {plain['ratio_min']:.3f}, "
        f"max {plain['ratio_max']:.3f}, {shape['repeats']} alternating pairs) |",
    ]
    for key, row in recompute.items():
        lines.append(f"| recompute={key} | {row['s'] * 1e3:.0f} ms, peak {row['peak_mb']:.0f} MB above "
                     f"the weights, {row['activation_mb']:.1f} MB saved for backward |")  # fmt: skip
    lines.append(
        f"| torch.compile of each layer (train.compile) | {compiled['compiled_s'] * 1e3:.0f} ms vs "
        f"{compiled['eager_s'] * 1e3:.0f} ms eager: {compiled['speedup']:.2f}x |"
    )
    lines.append(
        f"| glibc keeps freed memory (keep_freed_cpu_memory) | {memory['keep_freed_s'] * 1e3:.0f} ms vs "
        f"{memory['default_s'] * 1e3:.0f} ms with glibc's defaults: {memory['speedup']:.2f}x |"
    )
    for tp, row in scaling.items():
        comm = ""
        if tp > 1:
            comm = f"; {row['all_reduces']} all-reduces, {row['bytes'] / 1e6:.2f} MB per step (analytic "
            comm += f"{expected_count}, {expected_bytes / 1e6:.2f} MB)"
        lines.append(f"| TP={tp} on the same cores | {row['s'] * 1e3:.0f} ms, efficiency {100 * row['efficiency']:.0f}%"
                     f"{comm} |")  # fmt: skip
    print("\n".join(lines))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
