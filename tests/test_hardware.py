from megatron_exp import hardware
from megatron_exp.config import HardwareConfig


def test_cpu_peak_is_the_measured_matmul_ceiling_shared_by_the_workers(monkeypatch):
    monkeypatch.setattr(hardware, "measure_cpu_matmul_tflops", lambda: 1.2)
    resolved = hardware.resolve(HardwareConfig(), workers_sharing_cpu=4)
    assert (resolved.device, resolved.backend, resolved.precision) == ("cpu", "gloo", "fp32")
    assert resolved.peak_tflops == 0.3
    assert "measured" in resolved.name
    assert resolved.memory_gb == hardware.cpu_memory_gb()


def test_explicit_values_are_kept():
    hw = HardwareConfig(name="cpu", device="cpu", backend="gloo", precision="fp32", peak_tflops=2.0, memory_gb=8)
    assert hardware.resolve(hw, workers_sharing_cpu=2) == hw


def test_the_matmul_probe_measures_something():
    assert 0 < hardware.measure_cpu_matmul_tflops(size=256, seconds=0.05) < 100


def test_gpu_peaks_are_the_datasheet_numbers():
    peaks = dict(hardware.GPU_PEAK_TFLOPS)
    assert peaks["H100"] == peaks["H200"] == 989 and peaks["A100"] == 312 and peaks["V100"] == 125
    name = "NVIDIA H100 PCIe"
    assert next(t for key, t in hardware.GPU_PEAK_TFLOPS if key in name) == 756
