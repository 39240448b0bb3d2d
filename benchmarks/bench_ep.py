"""Benchmark: our expert-parallel fastmoe layer against DeepSpeed's MoE with ``ep_size=2``, and our
``FMoETransformerMLP`` on one process against the floor of :mod:`benchmarks.bench_moe`.

    python -m benchmarks.bench_ep            # the full configurations (minutes, on a quiet machine)
    python -m benchmarks.bench_ep --quick    # a tiny smoke run (about a minute: two DeepSpeed imports)

1. **Expert parallel, 2 processes (gloo):** :class:`common.fmoe.FMoETransformerMLP` with
   ``world_size=2`` (each process holds half the experts; :mod:`common.fmoe.expert_parallel` moves the
   routed rows) against ``deepspeed.moe.layer.MoE(ep_size=2)`` with the same experts
   (``Linear -> GELU -> Linear`` with biases), the same top-2 and the same tokens per process, forward
   and backward.  DeepSpeed runs with its defaults (``capacity_factor=1.0``, ``min_capacity=4``,
   ``drop_tokens=True``, second-expert sampling on): each expert gets ``C = 2 · tokens / experts``
   slots of each worker's tokens, over-capacity slots are dropped and the rest padded, so every worker
   computes ``E · C`` rows.  Ours runs twice: with fastmoe's default ``NaiveGate`` (no capacity: no
   slot dropped, and the worker whose experts are busiest computes more rows than the average), and,
   for the goal, with our ``GShardGate`` at DeepSpeed's capacity (:func:`capacity_gate`; it computes the
   kept rows, unpadded).  A round times one step of each, alternating, with a barrier before each; a
   step's time is the slower process's; the ratio is the median over rounds of ours / DeepSpeed's.
   Goal: <= 1.0x.
2. **One process:** ``FMoETransformerMLP`` against :class:`benchmarks.bench_moe.Floor` with
   ``kind="gelu"`` (the same expert's matmuls over ``tokens · k`` rows, no routing), forward and
   backward, interleaved, median of per-round ratios.  Goal: <= 1.3x.

The JSON (``benchmarks/results/bench_ep.json``, ``--json`` to change) records every round and every
library's settings.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.bench_moe import Floor, _randomize
from common.fmoe import FMoETransformerMLP
from common.fmoe.gates import GShardGate
from common.launch import run_workers
from common.runner import write_json
from common.timing import add_malloc_flag, apply_malloc_flag, machine_record, paired_ratio, race

CAPPED = "ours, DeepSpeed's capacity"  # GShardGate at DeepSpeed's capacity factor: the goal's contender
FORMAT = 2  # the JSON's layout; benchmarks.speed_section reads only this one

DEEPSPEED_SETTINGS = {  # deepspeed.moe.layer.MoE's defaults, as its users get them
    "k": 2,
    "capacity_factor": 1.0,
    "eval_capacity_factor": 1.0,
    "min_capacity": 4,
    "drop_tokens": True,
    "use_rts": True,
    "noisy_gate_policy": None,
    "top2_2nd_expert_sampling": True,
    "use_residual": False,
}


@dataclass
class Config:
    name: str
    tokens: int  # per process
    d_model: int
    experts: int  # in total
    d_hidden: int
    top_k: int
    goal_ep: float = 1.0
    goal_floor: float = 1.3


FULL = [
    Config("4096 tok/process, d 512, 16 experts x 1024, top-2", 4096, 512, 16, 1024, 2),
    Config("2048 tok/process, d 1024, 8 experts x 4096, top-2", 2048, 1024, 8, 4096, 2),
]
QUICK = [Config("256 tok/process, d 64, 8 experts x 128, top-2", 256, 64, 8, 128, 2)]


def capacity_gate(c: Config):
    """Our GShardGate with DeepSpeed's capacity: DeepSpeed gives each expert ``C = max(ceil(k · tokens /
    experts · factor), min_capacity)`` slots of a worker's tokens; fastmoe's GShardGate gives each
    ``ceil(rate · tokens) · k // experts``, so the rate ``C · experts / (k · tokens)`` gives the same C.
    fastmoe's random second-expert drop is off (DeepSpeed has none): both gates then keep the same
    slots' worth of work."""
    k, factor = c.top_k, DEEPSPEED_SETTINGS["capacity_factor"]
    slots = max(math.ceil(k * c.tokens / c.experts * factor), DEEPSPEED_SETTINGS["min_capacity"])
    rate = slots * c.experts / (k * c.tokens)
    return functools.partial(GShardGate, capacity=(rate, rate), random_routing=False)


def _fwd_bwd(module, x, grad):
    module.zero_grad(set_to_none=True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out  # DeepSpeed returns (out, l_aux, counts)
    out.backward(grad)


def _ep_worker(ctx, c: Config, repeats: int, warmup: int):
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    ne = c.experts // ctx.world_size
    ours = FMoETransformerMLP(ne, c.d_model, c.d_hidden, top_k=c.top_k, world_size=ctx.world_size)
    torch.manual_seed(0)  # the same weights, behind a gate with DeepSpeed's capacity
    capped = FMoETransformerMLP(
        ne, c.d_model, c.d_hidden, top_k=c.top_k, world_size=ctx.world_size, gate=capacity_gate(c)
    )
    expert = nn.Sequential(nn.Linear(c.d_model, c.d_hidden), nn.GELU(), nn.Linear(c.d_hidden, c.d_model))
    ds = MoE(c.d_model, expert, num_experts=c.experts, ep_size=ctx.world_size, **DEEPSPEED_SETTINGS)
    ds.set_deepspeed_parallelism()
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(c.tokens, c.d_model, generator=g)
    grad = torch.randn(c.tokens, c.d_model, generator=g)

    def step(module):
        dist.barrier()
        start = time.perf_counter()
        _fwd_bwd(module, x, grad)
        dist.barrier()  # the step ends when the slower process is done
        return time.perf_counter() - start

    contenders = {"ours": ours, CAPPED: capped, "DeepSpeed": ds}
    for _ in range(warmup):
        for module in contenders.values():
            step(module)
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, module in contenders.items():
            times[name].append(step(module))
    return times, torch.get_num_threads()  # both layers ran with this worker's thread count


def time_config(c: Config, repeats: int, warmup: int) -> dict:
    ep, worker_threads = run_workers(_ep_worker, 2, (c, repeats, warmup), timeout=1800)[0]
    torch.manual_seed(0)
    ours = FMoETransformerMLP(c.experts, c.d_model, c.d_hidden, top_k=c.top_k)
    floor = _randomize(Floor(c.d_model, c.d_hidden, kind="gelu"))
    x = torch.randn(c.tokens, c.d_model)
    rows = torch.randn(c.tokens * c.top_k, c.d_model)
    grads = {x.shape: torch.randn(x.shape), rows.shape: torch.randn(rows.shape)}
    one = race(
        {
            "floor": lambda: _fwd_bwd(floor, rows, grads[rows.shape]),
            "ours": lambda: _fwd_bwd(ours, x, grads[x.shape]),
        },
        repeats,
        warmup=warmup,
    )
    x_ds = paired_ratio(ep[CAPPED], ep["DeepSpeed"])
    x_floor = paired_ratio(one["ours"], one["floor"])
    return {
        "config": asdict(c),
        "ep_seconds": ep,  # rank 0's rounds, each the slower process's step
        "ep_median_s": {n: statistics.median(ts) for n, ts in ep.items()},
        "ep_x_deepspeed": x_ds,  # at DeepSpeed's capacity: the goal
        "ep_naive_x_deepspeed": paired_ratio(ep["ours"], ep["DeepSpeed"]),  # fastmoe's default gate
        "ep_threads_per_worker": worker_threads,
        "one_process_seconds": one,
        "one_process_median_s": {n: statistics.median(ts) for n, ts in one.items()},
        "x_floor": x_floor,
        "goal_ep_met": x_ds <= c.goal_ep,
        "goal_floor_met": x_floor <= c.goal_floor,
    }


def table(results: list[dict]) -> str:
    head = (
        "| config | EP ours ms (NaiveGate) | EP ours ms (DeepSpeed's capacity) | EP DeepSpeed ms "
        "| ours at DeepSpeed's capacity / DeepSpeed (goal) | NaiveGate / DeepSpeed | 1-proc ours ms "
        "| floor ms | ours / floor (goal) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        c, e, o = r["config"], r["ep_median_s"], r["one_process_median_s"]
        lines.append(
            f"| {c['name']} | {1e3 * e['ours']:.1f} | {1e3 * e[CAPPED]:.1f} | {1e3 * e['DeepSpeed']:.1f} | "
            f"{r['ep_x_deepspeed']:.2f}x ({c['goal_ep']:.1f}x {'met' if r['goal_ep_met'] else 'NOT met'}) | "
            f"{r['ep_naive_x_deepspeed']:.2f}x | {1e3 * o['ours']:.1f} | {1e3 * o['floor']:.1f} | "
            f"{r['x_floor']:.2f}x ({c['goal_floor']:.1f}x {'met' if r['goal_floor_met'] else 'NOT met'}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the benchmark")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (the median ratio is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="time only these configurations")
    add_malloc_flag(parser)
    parser.add_argument(
        "--json", default="benchmarks/results/bench_ep.json", help="where to write the results"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    from common.env import environment_report

    malloc = apply_malloc_flag(args)
    env = environment_report()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads (each of the 2 EP processes: "
        f"{max(1, (env['cores'] or 2) // 2)}), {env['cpu']} ({env['cores']} cores), malloc: {malloc}"
    )
    configs = QUICK if args.quick else FULL
    results = []
    for i, c in enumerate(configs):
        if args.only is not None and i not in args.only:
            continue
        print(f"timing: {c.name} ...", flush=True)
        results.append(time_config(c, args.repeats, args.warmup))
        r = results[-1]
        print(
            f"  EP ours/DeepSpeed {r['ep_x_deepspeed']:.2f}x at DeepSpeed's capacity, "
            f"{r['ep_naive_x_deepspeed']:.2f}x with NaiveGate; one process ours/floor {r['x_floor']:.2f}x",
            flush=True,
        )
    print(f"\n{table(results)}")
    payload = {
        "format": FORMAT,
        "quick": args.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "malloc": malloc,
        "settings": {
            "ours": "common.fmoe.FMoETransformerMLP, NaiveGate (fastmoe's default gate: no capacity), "
            "GELU experts "
            "with biases; EP over gloo all_to_all_single, counts first",
            CAPPED: "the same layer and weights with common.fmoe.gates.GShardGate(capacity=(r, r), "
            "random_routing=False), r = C * experts / (k * tokens): DeepSpeed's C slots per expert",
            "DeepSpeed": {
                "class": "deepspeed.moe.layer.MoE",
                **DEEPSPEED_SETTINGS,
                "ep_size": 2,
                "backend": "gloo",
            },
            "floor": "benchmarks.bench_moe.Floor(kind='gelu') on tokens*k rows",
        },
        "environment": machine_record(env, ("deepspeed",)),
        "results": results,
    }
    write_json(args.json, payload)
    print(f"\nwrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
