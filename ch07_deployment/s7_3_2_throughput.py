"""Section 7.3.2: throughput against batch size, time to first token, time per output token, Little's law.

A decode step reads every weight once whatever the batch, so while it is memory-bound a batch of B
sequences costs about what one costs and throughput grows about B-fold; it stops growing once the step
turns compute-bound (or the KV cache's reads dominate). The estimators (``generation_time``,
``decode_latency``, ``littles_law`` in ``common/estimate.py``) predict this from this machine's measured
bandwidth and FLOP/s; the script measures the same batched KV-cache generation with the project's
decoder LM and prints both, with time to first token (TTFT: the prompt pass) and time per output token
(TPOT: one decode step). Little's law ``L = λ·W`` then says how many requests are in flight at once (L)
for an arrival rate λ and a request time W, and so what arrival rate each batch size can sustain.

    python -m ch07_deployment.s7_3_2_throughput
    python -m ch07_deployment.s7_3_2_throughput --quick
"""

from __future__ import annotations

import time

import torch

from common import estimate
from common.env import torch_dtype
from common.machine import measure_machine
from common.models.decoder import DecoderConfig, DecoderLM
from common.runner import (
    add_dtype_flag,
    checks_done,
    int_between,
    int_list,
    parse_args,
    positive_float,
    quick_or_full,
    run_script,
    script_parser,
)


def measure(model: DecoderLM, batch: int, prompt: int, new: int) -> dict:
    """TTFT, fastest decode step (TPOT) and request time of batched generation with the KV cache."""
    idx = torch.randint(0, model.config.vocab_size, (batch, prompt + new))
    cache = model.new_kv_cache(batch, prompt + new)
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        model(idx[:, :prompt], kv_cache=cache, last_only=True)
        ttft = time.perf_counter() - start
        for i in range(prompt, prompt + new - 1):
            start = time.perf_counter()
            model(idx[:, i : i + 1], kv_cache=cache)
            steps.append(time.perf_counter() - start)
    tpot = min(steps)  # on a shared machine other processes only ever add time
    total = ttft + (new - 1) * tpot
    return {"ttft_s": ttft, "tpot_s": tpot, "total_s": total, "tokens_per_s": batch * new / total}


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument("--preset", default="small", choices=["small", "base"], help="the project's LM")
    parser.add_argument(
        "--batches",
        type=int_list(1, 4096),
        default=None,
        help="batch sizes (default 1,2,4,8,16,32; quick 1,4,16)",
    )
    parser.add_argument(
        "--prompt",
        type=int_between(1, 1 << 15),
        default=None,
        help="prompt tokens per request (default 64, quick 16)",
    )
    parser.add_argument(
        "--new",
        type=int_between(2, 1 << 15),  # the first token (TTFT) and at least one more (TPOT)
        default=None,
        help="generated tokens per request (default 32, quick 8)",
    )
    parser.add_argument(
        "--arrival-rate", type=positive_float, default=2.0, help="requests/s for Little's law"
    )
    args = parse_args(parser, argv)
    quick_or_full(args, batches=([1, 4, 16], [1, 2, 4, 8, 16, 32]), prompt=(16, 64), new=(8, 32))
    batches = args.batches
    config = DecoderConfig.preset(args.preset, vocab_size=8192, context_length=args.prompt + args.new)
    checks_done(args)

    machine = measure_machine("cpu", quick=args.quick)
    model = DecoderLM(config).eval().to(torch_dtype(args.dtype))  # weights and KV cache in --dtype
    measure(model, 1, 4, 3)  # warm up
    n = estimate.count_params(config)["total"]
    print(
        f"The project's decoder LM ({n:,} parameters, {args.dtype}); this machine: "
        f"{machine.bandwidth_gbs:.1f} GB/s, {machine.tflops(args.dtype) * 1e3:.1f} {args.dtype} GFLOP/s "
        "(measured)"
    )
    print(f"prompt {args.prompt} tokens, {args.new} new tokens per request\n")
    print(
        f"{'batch':>6}{'pred tok/s':>12}{'meas tok/s':>12}{'pred TTFT ms':>14}{'meas TTFT ms':>14}"
        f"{'pred TPOT ms':>14}{'meas TPOT ms':>14}{'bound':>8}"
    )
    figures = {"machine_bandwidth_gbs": machine.bandwidth_gbs}
    rows = []
    for b in batches:
        pred = estimate.generation_time(config, machine, b, args.prompt, args.new, dtype=args.dtype)
        context = args.prompt + args.new // 2
        bound = estimate.decode_latency(config, machine, b, context, dtype=args.dtype)["bound"]
        meas = measure(model, b, args.prompt, args.new)
        rows.append((b, pred, meas))
        print(
            f"{b:6d}{pred['tokens_per_s']:12.1f}{meas['tokens_per_s']:12.1f}{pred['ttft_s'] * 1e3:14.1f}"
            f"{meas['ttft_s'] * 1e3:14.1f}{pred['tpot_s'] * 1e3:14.2f}{meas['tpot_s'] * 1e3:14.2f}{bound:>8}"
        )
        figures |= {
            f"b{b}_pred_tok_s": pred["tokens_per_s"],
            f"b{b}_meas_tok_s": meas["tokens_per_s"],
            f"b{b}_meas_ttft_ms": meas["ttft_s"] * 1e3,
            f"b{b}_meas_tpot_ms": meas["tpot_s"] * 1e3,
        }
    first, last = rows[0], rows[-1]
    gain_pred = last[1]["tokens_per_s"] / first[1]["tokens_per_s"]
    gain_meas = last[2]["tokens_per_s"] / first[2]["tokens_per_s"]
    print(f"\nthroughput at batch {last[0]} over batch {first[0]}: ", end="")
    print(f"predicted {gain_pred:.1f}x, measured {gain_meas:.1f}x")
    figures |= {"throughput_gain_pred": gain_pred, "throughput_gain_meas": gain_meas}

    print(f"\nLittle's law, L = λ·W, at an arrival rate λ = {args.arrival_rate} requests/s:")
    for b, _, meas in rows:
        w = meas["total_s"]
        in_flight = estimate.littles_law(arrival_rate=args.arrival_rate, latency_s=w)
        sustainable = estimate.littles_law(concurrency=b, latency_s=w)
        print(
            f"  batch {b:3d}: a request takes W = {w:6.2f} s, so {in_flight:6.1f} requests are in flight; "
            f"{b} slots sustain λ = {sustainable:6.2f} requests/s"
        )
        figures[f"b{b}_sustainable_rps"] = sustainable
    return figures


if __name__ == "__main__":
    run_script(main)
