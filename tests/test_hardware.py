"""elmforest.models.hardware: peak FLOP/s from the datasheet table by GPU name, else a timed matmul."""

from __future__ import annotations

import math

import pytest
import torch

from elmforest.models import hardware


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5e12),  # SXM: 1,979 TFLOPS sparse / 2
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),
        ("NVIDIA H200", torch.bfloat16, 989.5e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),  # no TF32: plain FP32 matmuls
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.bfloat16, 362.05e12),  # not the L4 entry
        ("NVIDIA A10G", torch.bfloat16, 125e12),
        ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, 15.7e12),  # no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ],
)
def test_known_gpus_come_from_the_table(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(hardware, "measure_matmul_flops", pytest.fail)  # a known GPU is never timed
    assert hardware.peak_flops("cuda", dtype) == peak
    assert hardware.peak_flops(torch.device("cuda", 0), dtype) == peak
    assert hardware.mfu(peak / 4, "cuda", dtype) == pytest.approx(0.25)


def test_unknown_gpu_and_cpu_are_timed_once_and_cached(monkeypatch):
    calls: list[tuple[str, torch.dtype]] = []

    def fake(device, dtype, n=None):
        calls.append((str(device), dtype))
        return 1e12 if torch.device(device).type == "cuda" else 5e10

    monkeypatch.setattr(hardware, "_measured", {})
    monkeypatch.setattr(hardware, "measure_matmul_flops", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery Accelerator 9000")
    assert hardware.peak_flops("cuda:0") == 1e12
    assert hardware.peak_flops("cpu", torch.float32) == 5e10
    assert hardware.peak_flops("cpu", torch.float32) == 5e10
    assert hardware.mfu(1e10, "cpu", torch.float32) == pytest.approx(0.2)
    assert calls == [("cuda:0", torch.bfloat16), ("cpu", torch.float32)]  # each measured once


def test_cpu_matmul_measurement_is_real_and_draws_no_random_numbers():
    rng = torch.get_rng_state()
    flops = hardware.measure_matmul_flops("cpu", torch.float32, n=128)
    assert math.isfinite(flops) and flops > 0
    assert torch.equal(torch.get_rng_state(), rng)  # training's RNG stream is untouched
