"""This machine's own roofline: measured matrix-multiply FLOP/s and memory bandwidth.

The estimators of :mod:`common.estimate` take a :class:`~common.estimate.Hardware`; the GPU table there
holds datasheet figures, and :func:`measure_machine` builds one for the device a script runs on from two
short measurements (a square matmul, and a large tensor copy), so a prediction for this machine uses
what this machine does, not what a datasheet promises.
"""

from __future__ import annotations

import time

import torch

from common.estimate import Hardware


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(
    n: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    """FLOP/s of an (n, n) @ (n, n) product (2·n³ FLOPs), best of ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, repeats)


def memory_bandwidth(mbytes: int = 256, device: str = "cpu", repeats: int = 5) -> float:
    """Bytes/s of a large copy (each byte read once and written once: 2 × size moved), best of
    ``repeats``. The size is well beyond any cache, so this is what streaming weights can reach."""
    n = mbytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats)


def measure_machine(device: str = "cpu", quick: bool = False) -> Hardware:
    """A :class:`Hardware` for this machine from its measured fp32 and bf16 matmul and copy bandwidth
    (int8 left at 0: torch has no general int8 matmul to time here)."""
    n = 512 if quick else 1024
    fp32 = matmul_flops(n, torch.float32, device)
    bf16 = matmul_flops(n, torch.bfloat16, device)
    bw = memory_bandwidth(64 if quick else 256, device)
    if device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        import psutil

        memory = psutil.virtual_memory().total
    return Hardware(f"this {device}", fp32 / 1e12, bf16 / 1e12, 0.0, bw / 1e9, memory / 1e9)
