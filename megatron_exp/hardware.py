"""What the devices can do: peak FLOP/s, memory and count, from a hardware preset or detected.

GPU peaks are dense bf16/fp16 datasheet numbers. A CPU has no datasheet peak worth trusting, so it is measured:
a large fp32 matmul on all cores, the ceiling that a training step on this CPU could reach.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from megatron_exp.config import HardwareConfig

# hardware.precision -> the autocast dtype (fp32 runs without autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Dense bf16/fp16 TFLOP/s by a substring of torch.cuda.get_device_name(); the first match wins.
GPU_PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("V100", 125.0)]


def device_of(hardware: HardwareConfig) -> torch.device:
    """This process's device: its GPU (chosen when the process group started), or the CPU."""
    if hardware.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A context factory for the forward pass: autocast to bf16/fp16, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def parameter_dtype(hardware: HardwareConfig) -> torch.dtype | None:
    """The dtype of the parameters with `hardware.params=low`: the precision's (the optimizer keeps fp32 main
    weights, training/mixed_precision.py); None: they stay in the dtype they were built in."""
    return AUTOCAST_DTYPES[hardware.precision] if hardware.params == "low" else None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def cpu_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def detect() -> HardwareConfig:
    """The `auto` preset: the visible GPU kind, or the CPU."""
    if not torch.cuda.is_available():
        return HardwareConfig(name="cpu", device="cpu", backend="gloo", precision="fp32")
    gpu = torch.cuda.get_device_name(0)
    peak = next((tflops for key, tflops in GPU_PEAK_TFLOPS if key in gpu), None)
    bf16 = torch.cuda.is_bf16_supported()
    return HardwareConfig(
        name=gpu,
        device="cuda",
        backend="nccl",
        precision="bf16" if bf16 else "fp16",
        peak_tflops=peak,
        memory_gb=torch.cuda.get_device_properties(0).total_memory / 1e9,
        devices_per_node=torch.cuda.device_count(),
    )


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_cpu_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS (False where libc is not glibc).

    By default glibc maps large blocks (above a threshold that adapts up to 32 MiB: the logits, many activations)
    afresh, unmaps them on free and trims the heap, so each training step page-faults much of its working set in
    again (at the benchmark's shape, ~1.6M faults in a 15-step process; ~0.4M with this, nearly all while the
    first two steps grow the heap). Serving every block from the heap and never trimming it lets steps reuse warm
    pages (benchmarks/cpu_training.py measures the gain) at about the same peak resident memory. For CPU
    training processes, which allocate the same blocks every step.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    never = 2**31 - 1  # the largest int mallopt takes
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, never) == 1


def measure_cpu_matmul_tflops(size: int = 2048, seconds: float = 1.0) -> float:
    """fp32 matmul throughput of this process's threads (use all cores: it is the machine's ceiling).

    Counted per CPU-second this process was given, times its threads: another process busy on the machine
    takes cores away from the probe (wall-clock throughput halved on 2 cores) but not speed from them, so the
    ceiling measured is the cores' own (5% apart with and without a competing process, where wall clock gave 2x).
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    cpu_seconds = time.process_time() - cpu_start
    return 2 * size**3 * count / cpu_seconds * torch.get_num_threads() / 1e12


PEAK_PROBE_TRIALS, PEAK_PROBE_SECONDS = 8, 0.5


def _machine_key() -> str:
    """What the CPU peak depends on: the CPU model, the cores, and torch (its kernels)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    model = model or platform.processor() or platform.machine()
    return f"{model} | {os.cpu_count()} cores | torch {torch.__version__}"


def cpu_peak_tflops(cache: str) -> tuple[float, str]:
    """(the fp32 matmul ceiling of this machine's CPU, where it comes from): measured once per machine and torch
    version, the best of PEAK_PROBE_TRIALS probes, and kept in `cache` for every later run: a peak measured
    afresh at each start (by wall clock) moved 2x within an hour on a shared machine, and MFU with it."""
    path = Path(cache).expanduser()
    key = _machine_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), float):
        return known[key], f"cached in {path}"
    peak = max(measure_cpu_matmul_tflops(seconds=PEAK_PROBE_SECONDS) for _ in range(PEAK_PROBE_TRIALS))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: peak}, indent=2))
        os.replace(tmp, path)
    except OSError:
        return peak, "measured now (the cache could not be written)"
    return peak, f"measured now, cached in {path}"


def resolve(hw: HardwareConfig, workers_sharing_cpu: int, measure_peak: bool = True) -> HardwareConfig:
    """Fill every field left at "auto"/None from the machine. On CPU the peak per worker is the matmul ceiling of
    the whole CPU (`cpu_peak_tflops`) divided by the workers that share it (left unknown without `measure_peak`);
    hardware.peak_tflops pins it instead."""
    detected = detect() if hw.device in ("auto", "cuda") else HardwareConfig(name="cpu", device="cpu")
    if hw.device == "cpu":
        detected.backend, detected.precision = "gloo", "fp32"
    values = {}
    for name, value in vars(hw).items():
        auto = value is None or value == "auto"
        values[name] = getattr(detected, name) if auto else value
    if values["name"] == "auto":
        values["name"] = detected.name
    resolved = HardwareConfig(**values)
    if resolved.params == "auto":  # Megatron's choice on GPU: bf16/fp16 parameters with fp32 main weights
        resolved.params = "low" if resolved.device == "cuda" and resolved.precision in AUTOCAST_DTYPES else "fp32"
    if resolved.device == "cpu":
        if resolved.memory_gb is None:
            resolved.memory_gb = cpu_memory_gb()
        if resolved.peak_tflops is None and measure_peak:
            peak, source = cpu_peak_tflops(resolved.peak_cache)
            resolved.peak_tflops = peak / workers_sharing_cpu
            shared = f"/ {workers_sharing_cpu} workers"
            resolved.name = f"cpu (peak = fp32 matmul ceiling {peak:.3g} TFLOP/s, {source}, {shared})"
    return resolved
