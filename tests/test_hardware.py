import json
import subprocess
import sys

import pytest
import torch

from megatron_exp import hardware
from megatron_exp.config import HardwareConfig


def test_cpu_peak_is_the_measured_matmul_ceiling_shared_by_the_workers(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "measure_cpu_matmul_tflops", lambda seconds: 1.2)
    resolved = hardware.resolve(HardwareConfig(peak_cache=str(tmp_path / "peak.json")), workers_sharing_cpu=4)
    assert (resolved.device, resolved.backend, resolved.precision) == ("cpu", "gloo", "fp32")
    assert resolved.peak_tflops == 0.3
    assert "measured" in resolved.name
    assert resolved.memory_gb == hardware.cpu_memory_gb()


def test_the_cpu_peak_is_measured_once_per_machine_and_reused(monkeypatch, tmp_path):
    probes = []

    def probe(seconds):
        probes.append(seconds)
        return [0.30, 0.35, 0.33][len(probes) % 3]  # a busy moment lowers a probe: the best one is kept

    monkeypatch.setattr(hardware, "measure_cpu_matmul_tflops", probe)
    cache = str(tmp_path / "peak.json")
    first = hardware.resolve(HardwareConfig(peak_cache=cache), workers_sharing_cpu=1)
    assert len(probes) == hardware.PEAK_PROBE_TRIALS and first.peak_tflops == 0.35 and "measured now" in first.name
    again = hardware.resolve(HardwareConfig(peak_cache=cache), workers_sharing_cpu=2)
    assert len(probes) == hardware.PEAK_PROBE_TRIALS  # no new probe
    assert again.peak_tflops == 0.175 and f"cached in {cache}" in again.name
    pinned = hardware.resolve(HardwareConfig(peak_cache=str(tmp_path / "other.json"), peak_tflops=1.5), 2)
    assert pinned.peak_tflops == 1.5 and len(probes) == hardware.PEAK_PROBE_TRIALS
    assert hardware._machine_key() in json.loads((tmp_path / "peak.json").read_text())


def test_explicit_values_are_kept():
    hw = HardwareConfig(
        name="cpu", device="cpu", backend="gloo", precision="fp32", params="fp32", peak_tflops=2.0, memory_gb=8
    )
    assert hardware.resolve(hw, workers_sharing_cpu=2) == hw


@pytest.mark.parametrize(
    "device, precision, params, resolved, dtype",
    [
        ("cuda", "bf16", "auto", "low", torch.bfloat16),  # Megatron's default on GPU: fp32 main weights
        ("cuda", "fp16", "auto", "low", torch.float16),
        ("cuda", "bf16", "fp32", "fp32", None),  # fp32 parameters under autocast
        ("cuda", "fp32", "auto", "fp32", None),
        ("cpu", "bf16", "auto", "fp32", None),
        ("cpu", "bf16", "low", "low", torch.bfloat16),
    ],
)
def test_parameters_take_the_precisions_dtype_on_gpu_unless_asked_otherwise(device, precision, params, resolved, dtype):
    hw = HardwareConfig(name="x", device=device, backend="gloo", precision=precision, params=params, peak_tflops=1.0,
                        memory_gb=8, devices_per_node=1)  # fmt: skip
    hw = hardware.resolve(hw, workers_sharing_cpu=1)
    assert hw.params == resolved and hardware.parameter_dtype(hw) == dtype


def test_the_matmul_probe_measures_something():
    assert 0 < hardware.measure_cpu_matmul_tflops(size=256, seconds=0.05) < 100


def test_gpu_peaks_are_the_datasheet_numbers():
    peaks = dict(hardware.GPU_PEAK_TFLOPS)
    assert peaks["H100"] == peaks["H200"] == 989 and peaks["A100"] == 312 and peaks["V100"] == 125
    name = "NVIDIA H100 PCIe"
    assert next(t for key, t in hardware.GPU_PEAK_TFLOPS if key in name) == 756


_STEP_FAULTS = """
import resource, sys, torch
from megatron_exp.hardware import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
weight, x = torch.randn(1024, 4096, requires_grad=True), torch.randn(2048, 1024)
for step in range(10):  # a training-like step: 32 MiB blocks allocated and freed, the same ones each time
    if step == 2:  # after two warm-up steps
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (x @ weight).relu().square().sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keeping_freed_memory_stops_the_steps_faulting_their_blocks_in_again():
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    default, keep = faults("default"), faults("keep")
    assert default > 8 * 8192  # glibc maps the large blocks afresh: at least one 32 MiB block a step
    assert keep < default / 4  # a few blocks while the heap settles, then none
