"""Peak FLOP/s of a device, for model FLOPs utilisation (MFU).

    MFU = model FLOPs per token (models.flops_per_token) x tokens/s / peak FLOP/s of the device

Known GPUs are looked up by a substring of `torch.cuda.get_device_name`: dense (no 2:4
sparsity) tensor-core peaks from the vendor datasheets, in FLOP/s. Datasheets print the sparse
figure with an asterisk; the dense one is half of it. Any other device, a CPU included, gets a
timed matrix multiply in the requested dtype, measured once per process and cached: the
sustained GEMM rate with the threads this process has, a "peak" the device can actually reach,
so MFU there reads as a fraction of achievable rather than of advertised throughput.
"""

from __future__ import annotations

import time

import torch

# (substring of the device name, dense bf16 = fp16 tensor FLOP/s, fp32 FLOP/s without TF32).
# More specific names first: "H100 PCIe" must match before "H100".
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    # NVIDIA H100 datasheet: SXM BF16 1,979 TFLOPS* (sparse) -> 989.5 dense, FP32 67;
    # PCIe 1,513* -> 756.5, FP32 51; NVL 1,671* -> 835.5, FP32 60.
    ("H100 PCIe", 756.5e12, 51e12),
    ("H100 NVL", 835.5e12, 60e12),
    ("H100", 989.5e12, 67e12),
    # NVIDIA H200 datasheet: SXM BF16 1,979 TFLOPS* -> 989.5 dense, FP32 67; NVL 1,671* -> 835.5, FP32 60.
    ("H200 NVL", 835.5e12, 60e12),
    ("H200", 989.5e12, 67e12),
    # NVIDIA A100 datasheet (SXM and PCIe): BF16 312 TFLOPS (624*), FP32 19.5.
    ("A100", 312e12, 19.5e12),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733*), FP32 91.6.
    ("L40S", 362.05e12, 91.6e12),
    # NVIDIA L40 datasheet: BF16 181.05 TFLOPS (362.1*), FP32 90.5.
    ("L40", 181.05e12, 90.5e12),
    # NVIDIA L4 datasheet: BF16 242 TFLOPS* -> 121 dense, FP32 30.3.
    ("L4", 121e12, 30.3e12),
    # NVIDIA A10 datasheet: BF16 125 TFLOPS (250*), FP32 31.2. NVIDIA publishes no A10G sheet;
    # AWS's variant is taken at the A10's figures (an upper bound if its clocks are lower).
    ("A10G", 125e12, 31.2e12),
    ("A10", 125e12, 31.2e12),
    # NVIDIA V100 datasheet: SXM2 tensor (FP16) 125 TFLOPS, FP32 15.7; no bf16 tensor cores.
    ("V100", 125e12, 15.7e12),
    # NVIDIA Ada whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS
    # (330.3*), FP32 82.6. (autocast accumulates in FP32.)
    ("RTX 4090", 165.2e12, 82.6e12),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16 tensor with FP32 accumulate 71 TFLOPS (142*), FP32 35.6.
    ("RTX 3090", 71e12, 35.6e12),
)

_measured: dict[tuple[str, torch.dtype], float] = {}


def _table_peak(name: str, dtype: torch.dtype) -> float | None:
    for key, half, single in GPU_PEAKS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                # V100 has fp16 tensor cores only: bf16 runs at its FP32 rate.
                return single if key == "V100" and dtype == torch.bfloat16 else half
            return single
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak FLOP/s of `device` for matrix multiplies in `dtype` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = _table_peak(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    key = (str(device), dtype)
    if key not in _measured:
        _measured[key] = measure_matmul_flops(device, dtype)
    return _measured[key]


def mfu(flops_per_second: float, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of `peak_flops(device, dtype)`."""
    return flops_per_second / peak_flops(device, dtype)


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype, n: int | None = None) -> float:
    """FLOP/s of an n x n x n matrix multiply (2 n^3 FLOPs), best of a few after a warm-up.

    Values are constants, so no random number generator is touched (training's RNG stays
    bit-identical whether or not this ran)."""
    device = torch.device(device)
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.full((n, n), 0.5, dtype=dtype, device=device)
    b = torch.full((n, n), 0.25, dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: kernel selection, thread pool start
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / max(best, 1e-9)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU batch to `device`; to a GPU from pinned memory, without blocking the host."""
    if device.type == "cuda":  # page-locked memory lets the copy overlap with compute
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
