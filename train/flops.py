"""Analytic FLOPs and model FLOPs utilisation (MFU).

FLOPs per token = 6 * N_active + 12 * L * D * S: forward + backward of every matmul weight a
token actually uses (K of E experts, the output projection; not the embedding lookup),
plus attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). DeepSpeed's
profiler counts padded capacity instead, so we do not use it.
"""

from __future__ import annotations

import time

import torch

# Dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS = {"H200 NVL": 835.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                   "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
"""Dense bf16 TFLOP/s by a part of the device name, first match wins (so the PCIe and NVL parts come
before the SXM ones, whose names are plain "NVIDIA H100 80GB HBM3", "NVIDIA H200")."""


def flops_per_token(active_matmul_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * active_matmul_params + 12.0 * num_layers * hidden_size * seq_len


def peak_tflops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure comes from)."""
    if configured is not None:
        return configured, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name} bf16 datasheet"
        return float("nan"), f"{name} (unknown peak; set trainer.peak_tflops)"
    return measured_cpu_matmul_tflops(), "measured fp32 matmul on this CPU"


def measured_cpu_matmul_tflops(size: int = 512, seconds: float = 0.2, min_repeats: int = 5) -> float:
    """What this CPU sustains on an fp32 matmul: an honest ceiling for CPU MFU. The fastest of as
    many repeats as fit in `seconds`: a handful of samples could all land in a moment when another
    process holds the cores, and a low peak would put MFU above 100%. (512 is the size this kind
    of CPU runs fastest; larger ones measured lower.)"""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool start, page faults
    best, repeats, started = float("inf"), 0, time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - started < seconds:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return 2 * size**3 / best / 1e12
