"""Single-GPU training-step benchmark of the paper's single-GPU config (gpt_1b: 1.2B, seq 1024) in bf16.

    python benchmarks/gpu_training.py                                   # gpt_1b on one H100/H200
    python benchmarks/gpu_training.py --micro-batches 4,8 --compile on --recompute none,selective
    python benchmarks/gpu_training.py --device cpu --model gpt_tiny --micro-batches 2 --precision fp32 --steps 1

For each micro batch, each `parallel.recompute` mode asked for and with and without torch.compile, it times
full training steps (forward, backward, clipping, fused AdamW) and reports tokens/s, TFLOP/s and MFU against the
device's dense peak (989 TFLOP/s for H100 SXM and H200; see megatron_exp/hardware.py), with model FLOPs from
megatron_exp.training.flops (full s^2 attention). Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_exp.config import RECOMPUTE_MODES, ModelConfig, OptimizerConfig  # noqa: E402
from megatron_exp.hardware import AUTOCAST_DTYPES, GPU_PEAK_TFLOPS, measure_cpu_matmul_tflops  # noqa: E402
from megatron_exp.models.gpt import GPTModel  # noqa: E402
from megatron_exp.parallel import random, state  # noqa: E402
from megatron_exp.parallel.sharding import padded_vocab_size  # noqa: E402
from megatron_exp.training.flops import model_flops  # noqa: E402
from megatron_exp.training.optim import build_optimizer, clip_gradients_  # noqa: E402


def preset(name: str) -> ModelConfig:
    values = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    )
    cfg = OmegaConf.to_object(values)
    cfg.hidden_dropout = cfg.attention_dropout = 0.0  # dropout changes no FLOPs; off for steadier timing
    return cfg


def peak_tflops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next(t for key, t in GPU_PEAK_TFLOPS if key in name), f"{name} (datasheet dense bf16)"
    return measure_cpu_matmul_tflops(), "CPU (measured fp32 matmul)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: ModelConfig, device, micro_batch: int, recompute: str, compiled: bool, precision: str, steps: int):
    random.seed(0, 0, device)
    with torch.device(device):
        model = GPTModel(cfg, recompute=recompute)
    if compiled:
        model.compile_layers()  # as train.compile=true does
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5))
    dtype = AUTOCAST_DTYPES.get(precision)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), device=device)
    parameters = list(model.parameters())

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        model.loss(logits, tokens[:, 1:]).backward()
        clip_gradients_(parameters, 1.0, state.SERIAL)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up (and compilation)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt_1b", help="a preset in conf/model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--micro-batches", default="4,8,16")
    parser.add_argument("--recompute", default="none,selective,full", help="parallel.recompute modes, comma-separated")
    parser.add_argument("--compile", default="both", choices=["both", "on", "off"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "gpu_training.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = preset(args.model)
    peak, peak_source = peak_tflops(device)
    choices = {"both": [False, True], "on": [True], "off": [False]}
    modes = args.recompute.split(",")
    if unknown := set(modes) - set(RECOMPUTE_MODES):
        parser.error(f"--recompute: {', '.join(sorted(unknown))} is not one of {', '.join(RECOMPUTE_MODES)}")
    rows = []
    for micro, recompute, compiled in itertools.product(
        [int(m) for m in args.micro_batches.split(",")], modes, choices[args.compile]
    ):
        torch._dynamo.reset()  # each row compiles afresh; no cache of the previous model stays alive
        try:
            seconds, memory = measure(cfg, device, micro, recompute, compiled, args.precision, args.steps)
        except torch.OutOfMemoryError:
            seconds = None
        if seconds is None:  # outside the handler, so that the failed step's tensors are already released
            torch.cuda.empty_cache()
            rows.append({"micro_batch": micro, "recompute": recompute, "compile": compiled, "error": "out of memory"})
            continue
        flops = model_flops(micro, cfg.seq_len, cfg.layers, cfg.hidden, padded_vocab_size(cfg.vocab_size, 1))
        rows.append({
            "micro_batch": micro, "recompute": recompute, "compile": compiled, "step_s": seconds,
            "tokens_per_s": micro * cfg.seq_len / seconds, "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (peak * 1e12), "peak_memory_gb": memory,
        })  # fmt: skip
    results = {"model": args.model, "device": peak_source, "peak_tflops": peak, "precision": args.precision,
               "date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(
        f"{args.model}, seq {cfg.seq_len}, {args.precision}, {peak_source}, peak {peak:.4g} TFLOP/s; {results['date']}"
    )
    print(f"command: {results['command']}\n")
    print("| micro batch | recompute | compile | step (ms) | tokens/s | TFLOP/s | MFU | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['micro_batch']} | {r['recompute']} | {r['compile']} | {r['error']} | | | | |")
        else:
            timing = f"{1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}%"
            print(f"| {r['micro_batch']} | {r['recompute']} | {r['compile']} | {timing} | {r['peak_memory_gb']:.1f} |")
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
