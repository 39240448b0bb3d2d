"""Section 7.2.2: instruction sets (SIMD) and the BLAS behind numpy and torch, measured as GFLOP/s.

The same matrix product runs at very different speeds depending on how it reaches the hardware:

1. the CPU's SIMD features (SSE, AVX2/FMA, AVX-512, AMX on x86; NEON/SVE on ARM) and what torch
   dispatches to (``torch.backends.cpu.get_cpu_capability()``); the BLAS libraries numpy and torch load,
   with their thread pools (``threadpoolctl``);
2. GFLOP/s of an n x n matrix product: a pure-Python triple loop, numpy vectorised without BLAS
   (broadcast multiply and sum), numpy's BLAS in float64 and float32, torch in fp32 and bf16;
3. a scikit-learn fit (ridge regression: a BLAS-heavy ``X.T @ X``) with 1 BLAS thread against all;
4. the theoretical fp32 peak where it can be derived: cores x clock x FLOPs per cycle of the widest
   FMA units the flags show (2 FMA pipes: 32 FLOPs/cycle with AVX2, 64 with AVX-512).

The book titles its script "AVX-512" and runs it on a Ryzen 7 7435HS; that is a Zen 3+ part, which
has AVX2 but no AVX-512 (AMD's first AVX-512 cores are Zen 4): see ERRATA.md.

    python -m ch07_deployment.s7_2_2_instruction_sets
    python -m ch07_deployment.s7_2_2_instruction_sets --quick
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from common import env
from common.runner import checks_done, int_between, parse_args, quick_or_full, run_script, script_parser


def cpu_info() -> tuple[str, set[str], float | None]:
    """(model name, SIMD feature flags, current clock in GHz): the flags as the environment report reads
    them (:mod:`common.env`), the clock from /proc/cpuinfo where Linux has one."""
    name, flags = env.cpu_model_and_flags()
    ghz = None
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next((line.split(":")[1] for line in f if line.startswith("cpu MHz")), None)
        ghz = float(mhz) / 1000 if mhz else None
    except OSError:
        pass
    return name, set(flags), ghz


def best_seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def python_matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """The textbook triple loop: one multiply-add per innermost step, no SIMD, no BLAS."""
    n, m, p = len(a), len(b), len(b[0])
    out = [[0.0] * p for _ in range(n)]
    for i in range(n):
        row, out_row = a[i], out[i]
        for k in range(m):
            aik, b_row = row[k], b[k]
            for j in range(p):
                out_row[j] += aik * b_row[j]
    return out


def matmul_gflops(sizes: dict[str, int]) -> dict[str, float]:
    rng = np.random.default_rng(0)
    results = {}

    def gflops(label: str, n: int, fn) -> None:
        results[label] = 2 * n**3 / best_seconds(fn) / 1e9
        print(f"  {label:34} n={n:5d}  {results[label]:10.3f} GFLOP/s")

    n = sizes["python"]
    a, b = rng.standard_normal((n, n)).tolist(), rng.standard_normal((n, n)).tolist()
    gflops("pure Python loop", n, lambda: python_matmul(a, b))
    n = sizes["vectorised"]
    a32, b32 = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    gflops("numpy vectorised, no BLAS (float32)", n, lambda: (a32[:, :, None] * b32[None, :, :]).sum(axis=1))
    n = sizes["blas"]
    a64, b64 = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    gflops("numpy BLAS float64", n, lambda: a64 @ b64)
    a32, b32 = a64.astype(np.float32), b64.astype(np.float32)
    gflops("numpy BLAS float32", n, lambda: a32 @ b32)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    gflops("torch fp32", n, lambda: ta @ tb)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    gflops("torch bf16", n, lambda: ta16 @ tb16)
    return results


def sklearn_threads(rows: int, cols: int) -> dict[str, float]:
    from sklearn.linear_model import Ridge
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((rows, cols)), rng.standard_normal(rows)
    fit = lambda: Ridge(alpha=1.0, solver="cholesky").fit(x, y)  # noqa: E731
    with threadpool_limits(limits=1, user_api="blas"):
        one = best_seconds(fit)
    every = best_seconds(fit)
    threads = max(info["num_threads"] for info in __import__("threadpoolctl").threadpool_info())
    print(
        f"\nscikit-learn Ridge fit on {rows}x{cols}: 1 BLAS thread {one * 1e3:.0f} ms, "
        f"{threads} threads {every * 1e3:.0f} ms: {one / every:.2f}x"
    )
    return {"ridge_1_thread_s": one, "ridge_all_threads_s": every, "ridge_thread_speedup": one / every}


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--n",
        type=int_between(1, 16384),
        default=None,
        help="matrix size of the BLAS and torch products (default 1024, quick 256)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, n=(256, 1024))
    checks_done(args)
    sizes = {"python": 64, "vectorised": 192, "blas": args.n}
    rows, cols = 20000, 800
    if args.quick:
        sizes, rows, cols = {"python": 32, "vectorised": 96, "blas": args.n}, 4000, 200

    name, flags, ghz = cpu_info()
    from threadpoolctl import threadpool_info

    print(f"CPU: {name} ({platform.machine()}), {os.cpu_count()} logical CPUs, ", end="")
    print(f"torch uses {torch.get_num_threads()} threads")
    print(f"SIMD features: {', '.join(sorted(flags)) or 'none found'}")
    print(f"torch dispatches to: {torch.backends.cpu.get_cpu_capability()}")
    has_avx512 = "avx512f" in flags
    print(f"AVX-512 on this machine: {'yes' if has_avx512 else 'no'}. ", end="")
    print("The book's Ryzen 7 7435HS (Zen 3+) has none:")
    print(
        "  AVX-512 arrived on AMD with Zen 4; its script's title promises an instruction set its CPU lacks."
    )
    print("\nThread pools (threadpoolctl):")
    for info in threadpool_info():
        print(
            f"  {info['user_api']:7} {info['internal_api']:10} {info.get('version') or '':12} "
            f"threads={info['num_threads']}  {os.path.basename(info['filepath'])}"
        )

    print("\nMatrix product, best of 3:")
    results = matmul_gflops(sizes)
    figures = {f"gflops_{k.split(',')[0].replace(' ', '_')}": v for k, v in results.items()}
    figures["blas_over_python_x"] = results["numpy BLAS float32"] / results["pure Python loop"]
    figures |= sklearn_threads(rows, cols)

    flops_per_cycle = 64 if has_avx512 else 32 if {"avx2", "fma"} <= flags else None
    if flops_per_cycle and ghz:
        cores = torch.get_num_threads()
        peak = cores * ghz * flops_per_cycle
        print(
            f"\nTheoretical fp32 peak: {cores} cores x {ghz:.2f} GHz (current clock) x {flops_per_cycle} "
            f"FLOPs/cycle = {peak:.0f} GFLOP/s; torch fp32 reached {results['torch fp32'] / peak:.0%}"
        )
        print("  (a 2-FMA-pipe assumption; some AVX-512 cores, Zen 4 among them, split 512-bit FMAs into two")
        print("  256-bit halves and peak at the AVX2 rate)")
        figures |= {"theoretical_fp32_gflops": peak, "torch_fp32_of_peak": results["torch fp32"] / peak}
    else:
        print("\nTheoretical peak: not derived (no clock or no known FMA width in the CPU's flags)")
    figures |= {"has_avx512": has_avx512, "has_avx2": "avx2" in flags, "cpu": name}
    return figures


if __name__ == "__main__":
    run_script(main)
