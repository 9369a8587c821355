"""What the devices can do: peak FLOP/s, memory and count, from a hardware preset or detected.

GPU peaks are dense bf16/fp16 datasheet numbers. A CPU has no datasheet peak worth trusting, so it is measured:
a large fp32 matmul on all cores, the ceiling that a training step on this CPU could reach.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

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
    """fp32 matmul throughput of this process's threads (use all cores: it is the machine's ceiling)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed / 1e12


def resolve(hw: HardwareConfig, workers_sharing_cpu: int, measure_peak: bool = True) -> HardwareConfig:
    """Fill every field left at "auto"/None from the machine. On CPU the peak per worker is the measured matmul
    ceiling of the whole CPU divided by the workers that share it (left unknown without `measure_peak`)."""
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
    if resolved.device == "cpu":
        if resolved.memory_gb is None:
            resolved.memory_gb = cpu_memory_gb()
        if resolved.peak_tflops is None and measure_peak:
            resolved.peak_tflops = measure_cpu_matmul_tflops() / workers_sharing_cpu
            resolved.name = f"cpu (peak = measured fp32 matmul / {workers_sharing_cpu} workers)"
    return resolved
