"""Section 6.5: what expert parallelism costs in communication: the all-to-all of one MoE layer.

Each of ``W`` workers holds ``T`` tokens of width ``d`` (``b`` bytes per number) and ``E / W`` of the
``E`` experts; every token goes to ``k`` experts.  One all-to-all carries the tokens to their
experts (dispatch) and one brings the outputs back (combine); the backward pass does both again.
Bytes one worker sends to the others per all-to-all:

* **without padding** (fastmoe, :mod:`common.fmoe`: counts first, then exactly the routed rows):
  ``T · k · d · b · (W - 1) / W`` when the router spreads tokens evenly (the rows for its own
  experts stay home), plus the ``E`` counts;
* **with a fixed capacity** (DeepSpeed, GShard: every expert gets ``C = ceil(f · k · T / E)`` slots,
  padded): ``E · C · d · b · (W - 1) / W`` whatever the routing, about ``f`` times the above.

The script measures both on the process group (gloo here): the bytes of the split sizes actually
sent to the other workers, and the time of the exchange, over a grid of tokens, experts, top-k and
capacity factors, and plots bytes and time against tokens.

    python -m ch06_distributed_moe.s6_5_all_to_all_cost
    python -m ch06_distributed_moe.s6_5_all_to_all_cost --quick
    torchrun --nproc_per_node 4 -m ch06_distributed_moe.s6_5_all_to_all_cost

A reader sees a table (formula vs measured bytes, milliseconds per exchange) and
``all_to_all_cost.png``.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from common.fmoe.expert_parallel import all_to_all, exchange_counts, local_experts
from common.launch import is_main, job_size, run_workers
from common.plotting import pyplot, save_figure
from common.runner import (
    checks_done,
    float_between,
    int_between,
    parse_args,
    positive_int,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)


def formula_bytes(tokens, experts, world, k, d, elem, capacity_factor=None) -> float:
    """Bytes one worker sends to the others per all-to-all (even routing); padded when a factor is given."""
    remote = (world - 1) / world
    if capacity_factor is None:
        return tokens * k * d * elem * remote
    return experts * math.ceil(capacity_factor * k * tokens / experts) * d * elem * remote


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(ctx, configs, d, repeats, seed):
    rank, world = ctx.rank, ctx.world_size
    g = torch.Generator().manual_seed(seed + rank)
    rows_out = []
    for tokens, experts, k, cf in configs:
        local_experts(experts, world)
        x = torch.randn(tokens, d, generator=g)
        logits = torch.randn(tokens, experts, generator=g)  # an even router
        idx = logits.topk(k, dim=-1).indices  # (tokens, k)
        counts = torch.bincount(idx.reshape(-1), minlength=experts)  # (E,) slots per global expert
        order = idx.reshape(-1).argsort(stable=True)
        rows = x.index_select(0, order // k)  # (tokens·k, d) sorted by expert, so by destination
        send = counts.view(world, -1).sum(1).tolist()

        def unpadded(counts=counts, rows=rows, send=send):
            recv = exchange_counts(counts, world).view(world, -1).sum(1).tolist()  # counts first
            return all_to_all(rows, send, recv)  # then the rows

        capacity = math.ceil(cf * k * tokens / experts)
        padded = torch.zeros(experts * capacity, d)  # (E·C, d): every expert's slots, filled or not
        per_rank = [experts // world * capacity] * world

        def padded_exchange(padded=padded, per_rank=per_rank):
            return all_to_all(padded, per_rank, per_rank)

        elem = x.element_size()
        rows_out.append(
            {
                "tokens": tokens,
                "experts": experts,
                "k": k,
                "capacity_factor": cf,
                "sent_bytes_unpadded": (sum(send) - send[rank]) * d * elem,
                "sent_bytes_padded": (sum(per_rank) - per_rank[rank]) * d * elem,
                "ms_unpadded": 1e3 * _timed(unpadded, repeats),
                "ms_padded": 1e3 * _timed(padded_exchange, repeats),
            }
        )
    return rows_out


def plot(path, rows, world):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = [r for r in rows if r["experts"] == rows[0]["experts"] and r["k"] == rows[0]["k"]]
    base = [r for r in base if r["capacity_factor"] == base[0]["capacity_factor"]]
    t = [r["tokens"] for r in base]
    a1.plot(t, [r["sent_bytes_unpadded"] / 1e6 for r in base], "o-", label="routed rows only (fastmoe)")
    a1.plot(t, [r["sent_bytes_padded"] / 1e6 for r in base], "s-", label="fixed capacity (DeepSpeed)")
    a1.set(
        xlabel="tokens per worker",
        ylabel="MB sent to other workers",
        title=f"one all-to-all, {world} workers",
    )
    a2.plot(t, [r["ms_unpadded"] for r in base], "o-", label="routed rows only")
    a2.plot(t, [r["ms_padded"] for r in base], "s-", label="fixed capacity")
    a2.set(xlabel="tokens per worker", ylabel="ms per exchange (gloo)", title="time")
    for ax in (a1, a2):
        ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--nproc", type=process_count, default=2, help="worker processes")
    parser.add_argument("--d-model", type=width_int, default=512, help="token width")
    parser.add_argument(
        "--tokens",
        type=int_between(1, 1 << 20),
        nargs="+",
        default=None,
        help="tokens per worker (default 512 1024 2048 4096 8192; quick 256 1024)",
    )
    parser.add_argument(
        "--experts",
        type=int_between(1, 4096),
        nargs="+",
        default=None,
        help="experts in total (default 8 32; quick 8)",
    )
    parser.add_argument(
        "--top-k", type=int_between(1, 4096), nargs="+", default=[1, 2], help="experts per token"
    )
    parser.add_argument(
        "--capacity-factor",
        type=float_between(0, 1024, low_open=True),
        nargs="+",
        default=None,
        help="capacity factors (default 1.0 1.25 2.0; quick 1.25)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed exchanges per point, median (default 5, quick 3)",
    )
    args = parse_args(parser, argv)
    quick_or_full(
        args,
        tokens=([256, 1024], [512, 1024, 2048, 4096, 8192]),
        experts=([8], [8, 32]),
        capacity_factor=([1.25], [1.0, 1.25, 2.0]),
        repeats=(3, 5),
    )
    world = job_size(args.nproc)
    for e in args.experts:
        if e % world:
            parser.error(f"--experts {e} must divide by the {world} workers")
    for e, k in ((e, k) for e in args.experts for k in args.top_k):
        if not 1 <= k <= e:
            parser.error(f"--top-k {k} must be between 1 and the number of experts ({e})")
    configs = [
        (t, e, k, cf)
        for e in args.experts
        for k in args.top_k
        for cf in args.capacity_factor
        for t in args.tokens
    ]
    checks_done(args)
    results = run_workers(_worker, args.nproc, (configs, args.d_model, args.repeats, args.seed), timeout=900)
    if not is_main():
        return {}
    rows = results[0]  # rank 0's view; every rank sends alike under an even router
    elem = 4
    print(f"{world} workers, d_model {args.d_model}, fp32; bytes rank 0 sends to the others per all-to-all\n")
    print("tokens  experts  k  factor   formula MB  measured MB   ms  | padded: formula MB  measured MB   ms")
    worst = 0.0
    for r in rows:
        f_un = formula_bytes(r["tokens"], r["experts"], world, r["k"], args.d_model, elem)
        f_pad = formula_bytes(
            r["tokens"], r["experts"], world, r["k"], args.d_model, elem, r["capacity_factor"]
        )
        worst = max(worst, abs(r["sent_bytes_unpadded"] / f_un - 1))
        assert r["sent_bytes_padded"] == round(f_pad), (r, f_pad)  # padding makes the formula exact
        print(
            f"{r['tokens']:6d}  {r['experts']:7d}  {r['k']}  {r['capacity_factor']:6.2f}  "
            f"{f_un / 1e6:11.3f}  "
            f"{r['sent_bytes_unpadded'] / 1e6:11.3f} {r['ms_unpadded']:5.1f} | {f_pad / 1e6:17.3f}  "
            f"{r['sent_bytes_padded'] / 1e6:11.3f} {r['ms_padded']:5.1f}"
        )
    print(
        f"\nunpadded: measured within {100 * worst:.1f}% of the even-routing formula (routing is random); "
        f"padded: exact. Forward and backward each do two all-to-alls per MoE layer."
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "all_to_all_cost.png")
    plot(path, rows, world)
    print(f"plot: {path}")
    big = max(rows, key=lambda r: (r["tokens"], r["k"]))
    return {
        "workers": world,
        "unpadded_max_rel_diff_to_formula": worst,
        "largest_tokens": big["tokens"],
        "largest_sent_mb_unpadded": big["sent_bytes_unpadded"] / 1e6,
        "largest_sent_mb_padded": big["sent_bytes_padded"] / 1e6,
        "largest_ms_unpadded": big["ms_unpadded"],
        "largest_ms_padded": big["ms_padded"],
    }


if __name__ == "__main__":
    run_script(main)
