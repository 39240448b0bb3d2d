"""Round-robin timing, shared by the benchmarks and the section scripts: contenders alternate round by
round, ratios are taken round by round; the share of a run spent in matrix products; the allocator
flag."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def sync(device: str) -> None:
    """Wait for the GPU's queued work on ``cuda`` / ``cuda:N``; nothing elsewhere."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str = "cpu") -> float:
    """Seconds one call of ``fn`` takes (waiting for the GPU on cuda)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def race(contenders: dict, repeats: int, device: str = "cpu", warmup: int = 1) -> dict[str, list[float]]:
    """Run every contender ``warmup`` times, then ``repeats`` rounds of one run each, alternating, so
    that load from elsewhere hits all of them alike; seconds per run, round by round."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over the rounds of the two times measured in the same round: slow drifts of a shared
    machine cancel, where a ratio of two medians would keep them."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_share(fn, rounds: int = 5) -> float:
    """Fraction of ``fn``'s CPU time (torch profiler, self time, ``rounds`` calls) spent inside matrix
    products. ``1 - share`` is what any runtime could save by cutting everything but the GEMMs: at
    equal GEMM speed no engine runs ``fn`` in less than ``share`` of its time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc at its defaults (tensors over 32 MiB page-fault on every allocation); "
        "by default the benchmark keeps freed memory for reuse (common.env.keep_freed_memory), a "
        "process-wide setting it opts in to for itself",
    )


def apply_malloc_flag(args: argparse.Namespace) -> str:
    """Keep freed memory unless ``--system-malloc`` (the benchmark opts in for its own process); returns
    the setting in words, for the output and the JSON."""
    from common.env import keep_freed_memory

    return "system defaults" if args.system_malloc or not keep_freed_memory() else "freed memory kept"


def machine_record(env: dict, packages: tuple[str, ...]) -> dict:
    """What a benchmark's JSON says of where it ran: the CPU, its cores, torch's version and the named
    packages' versions, from :func:`common.env.environment_report`'s ``env``."""
    return {
        "cpu": env["cpu"],
        "cores": env["cores"],
        "torch": torch.__version__,
        **{name: env["packages"][name]["version"] for name in packages},
    }
