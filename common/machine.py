"""This machine's own roofline: measured matrix-multiply FLOP/s and memory bandwidth.

The estimators of :mod:`common.estimate` take a :class:`~common.estimate.Hardware`; the GPU table there
holds datasheet figures, and :func:`measure_machine` builds one for the device a script runs on from two
short measurements (a square matmul, and a large tensor copy), so a prediction for this machine uses
what this machine does, not what a datasheet promises.
"""

from __future__ import annotations

import os
import time

import torch

from common.estimate import Hardware
from common.timing import sync


def best_seconds(fn, device: str, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call (waiting for the GPU
    on cuda): on a shared machine other work only ever adds time."""
    fn()  # warm up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(
    n: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5
) -> float:
    """FLOP/s of an (n, n) @ (n, n) product (2·n³ FLOPs), best of ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), device, repeats)


def memory_bandwidth(mbytes: int = 256, device: str = "cpu", repeats: int = 5) -> float:
    """Bytes/s of a large copy (each byte read once and written once: 2 × size moved), best of
    ``repeats``. The size is well beyond any cache, so this is what streaming weights can reach."""
    n = mbytes * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: dst.copy_(src), device, repeats)


def matvec_bandwidth(weights: list[torch.Tensor], device: str = "cpu", repeats: int = 5) -> float:
    """Bytes/s at which ``F.linear`` at batch 1 (one matrix-vector product per weight, as a decode step
    does) reads ``weights``, all of them in turn, best of ``repeats``. Beside :func:`memory_bandwidth` it
    shows how much of the machine's bandwidth the BLAS's matrix-vector kernel reaches."""
    import torch.nn.functional as F

    inputs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in weights]

    def products():
        for x, w in zip(inputs, weights):
            F.linear(x, w)

    return sum(w.nbytes for w in weights) / best_seconds(products, device, repeats)


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


# ----------------------------------------------------------------------------- peak resident memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_child(conn, setup, work, args, warmup) -> None:
    import gc

    try:
        if warmup is not None:
            warmup()
        gc.collect()
        before = _status_kib("VmRSS")
        _reset_peak()
        state = setup(*args)
        gc.collect()
        after_setup = _status_kib("VmRSS")
        start = time.perf_counter()
        result = work(state)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        conn.send(
            {
                "setup_bytes": 1024 * (after_setup - before),
                "peak_bytes": 1024 * (peak - before),
                "seconds": seconds,
                "result": result,
            }
        )
    except BaseException as e:  # noqa: BLE001 - the parent reports it
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def peak_memory(setup, work, *args, warmup=None, timeout: float = 600) -> dict:
    """Run ``state = setup(*args)`` and then ``work(state)`` in a fresh process and return how far its
    resident memory rose above where it stood before ``setup``: ``setup_bytes`` (after setup),
    ``peak_bytes`` (the highest point, setup and work together), ``seconds`` (of ``work``) and ``result``
    (what ``work`` returned). A fresh process means no memory freed by earlier work is there to reuse.
    ``warmup()``, run first and not counted, lets the libraries set up their own buffers and threads
    (BLAS workspaces, autograd's worker) on a small problem, so they do not count as the model's.
    ``setup`` and ``work`` must be module-level functions (they are pickled to the child). Linux only:
    it reads and resets the kernel's high-water mark in ``/proc/self``.
    """
    import multiprocessing as mp

    if not os.path.exists("/proc/self/clear_refs"):
        raise OSError("peak_memory needs Linux's /proc/self/clear_refs")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(child, setup, work, args, warmup))
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        raise TimeoutError(f"peak_memory: {work.__name__} did not finish in {timeout} s")
    out = parent.recv()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"peak_memory: {work.__name__} failed in its process: {out['error']}")
    return out
