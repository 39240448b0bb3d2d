"""Section 7.3.2: latency estimation with a roofline: prefill is compute-bound, decode memory-bound.

A step takes at least ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``. The prompt pass (prefill) does
``2·N`` FLOPs per prompt token on weights read once: compute-bound. A decode step does ``2·N`` FLOPs per
sequence in the batch but reads every weight (and the KV cache) once: at batch 1 it is memory-bound, and
it turns compute-bound only at the batch where FLOPs per byte reach the hardware's ridge point. The
estimators are ``prefill_latency``, ``decode_latency`` and ``crossover_batch`` in ``common/estimate.py``.

The script prints, for Llama-2-7B and the project's decoder LM on every GPU of the datasheet table, the
prefill and decode latency and the crossover batch; draws the roofline (``roofline.png``); and measures
the project's LM decoding at batch 1 on this machine against the prediction from this machine's measured
bandwidth and FLOP/s (goal: within 2x), with the gap explained by measurement: the per-step overhead of
a model of the same depth whose weights are negligible, and the rate at which torch's matrix-vector
product (``F.linear`` at batch 1) reads this model's own matrices, beside the copy bandwidth.

Where the CPU multiplies bf16 natively (AVX512_BF16 or AMX; or when asked with ``--dtype bf16``) it also
measures the prompt pass and a decode step with the weights and KV cache in bf16 beside fp32, each against
the estimator at that dtype's measured FLOP/s and bytes: prefill, compute-bound, should gain what the
bf16 matmul rate gains over fp32; decode, memory-bound, at most the halved bytes.

    python -m ch07_deployment.s7_3_2_latency_estimation
    python -m ch07_deployment.s7_3_2_latency_estimation --quick
"""

from __future__ import annotations

import os
import time

import torch

from common import estimate
from common.env import cpu_bf16_native, torch_dtype
from common.machine import matvec_bandwidth, measure_machine, memory_bandwidth
from common.models.decoder import DecoderConfig, DecoderLM
from common.plotting import pyplot, save_figure
from common.runner import (
    add_dtype_flag,
    checks_done,
    int_between,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
)


def gpu_table(config, label: str, prompt: int, context: int) -> dict:
    print(f"\n{label}, bf16: prefill of {prompt} tokens, decode at batch 1 and context {context}")
    print(f"  {'GPU':12}{'prefill ms':>12}{'decode ms':>11}{'tok/s':>8}{'crossover b':>13}{'at 1 token':>12}")
    figures = {}
    for name in estimate.GPUS:
        pre = estimate.prefill_latency(config, name, 1, prompt)["seconds"]
        dec = estimate.decode_latency(config, name, 1, context)["seconds"]
        cross = estimate.crossover_batch(config, name, context)
        cross1 = estimate.crossover_batch(config, name, 1)
        print(f"  {name:12}{pre * 1e3:12.2f}{dec * 1e3:11.3f}{1 / dec:8.0f}{cross:13.0f}{cross1:12.0f}")
        figures[f"{label}_{name}_decode_ms"] = dec * 1e3
    print("  (inf: the KV cache of full multi-head attention keeps decode memory-bound at any batch)")
    return figures


def plot_roofline(path: str, config, machine: estimate.Hardware, context: int) -> None:
    """Attainable FLOP/s against arithmetic intensity, with Llama-2-7B's decode at several batches."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [2.0**k for k in range(-3, 13)]
    for hw in (estimate.gpu("h100-sxm"), estimate.gpu("a100-80gb"), estimate.gpu("rtx-4060"), machine):
        peak = hw.bf16_tflops * 1e12
        ax.loglog(xs, [min(peak, x * hw.bandwidth_gbs * 1e9) for x in xs], label=hw.name)
    for batch in (1, 16, 256):
        d = estimate.decode_latency(config, "h100-sxm", batch, context)
        ax.axvline(d["flops"] / d["bytes"], ls=":", color="grey")
        ax.text(d["flops"] / d["bytes"], 2e9, f" decode b={batch}", rotation=90, fontsize=7)
    ax.set(xlabel="FLOPs per byte moved", ylabel="attainable FLOP/s (bf16)", title="Roofline: llama-2-7b")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _decode_step_times(model: DecoderLM, prompt: int, new: int) -> tuple[float, float]:
    """(prompt pass seconds, fastest decode step in seconds) at batch 1 with the KV cache. The fastest step,
    not the median: on a shared machine other processes only ever add time."""
    model.eval()
    idx = torch.randint(0, model.config.vocab_size, (1, prompt + new))
    cache = model.new_kv_cache(1, prompt + new)
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        model(idx[:, :prompt], kv_cache=cache, last_only=True)
        ttft = time.perf_counter() - start
        for i in range(prompt, prompt + new):
            start = time.perf_counter()
            model(idx[:, i : i + 1], kv_cache=cache)
            steps.append(time.perf_counter() - start)
    return ttft, min(steps)


def _prefill_time(model: DecoderLM, prompt: int, repeats: int = 3) -> float:
    """Fastest of ``repeats`` prompt passes of ``prompt`` tokens at batch 1 (into a fresh KV cache)."""
    idx = torch.randint(0, model.config.vocab_size, (1, prompt))
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up: not counted
            cache = model.new_kv_cache(1, prompt)
            start = time.perf_counter()
            model(idx, kv_cache=cache, last_only=True)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def dtype_comparison(
    config: DecoderConfig, machine: estimate.Hardware, prefill: int, prompt: int, new: int
) -> dict:
    """The prompt pass and a decode step of the project's LM in fp32 and in bf16 (weights and KV cache),
    each beside the estimator at that dtype (its measured matmul rate, its bytes per weight)."""
    print(
        f"\nfp32 and bf16 on this CPU (measured matmul: fp32 {machine.fp32_tflops * 1e3:.0f}, bf16 "
        f"{machine.bf16_tflops * 1e3:.0f} GFLOP/s): prefill of {prefill} tokens, decode at batch 1"
    )
    print(
        f"  {'dtype':6}{'prefill pred ms':>17}{'meas ms':>9}{'ratio':>7}"
        f"{'decode pred ms':>16}{'meas ms':>9}{'ratio':>7}"
    )
    figures, measured = {}, {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = DecoderLM(config).eval().to(torch_dtype(name))
        pre = estimate.prefill_latency(config, machine, 1, prefill, dtype=name)["seconds"]
        dec = estimate.decode_latency(config, machine, 1, prompt + new // 2, dtype=name)["seconds"]
        pre_m = _prefill_time(model, prefill)
        _decode_step_times(model, 4, 4)  # warm up
        _, dec_m = _decode_step_times(model, prompt, new)
        measured[name] = (pre_m, dec_m)
        print(
            f"  {name:6}{pre * 1e3:17.2f}{pre_m * 1e3:9.2f}{pre_m / pre:7.2f}"
            f"{dec * 1e3:16.3f}{dec_m * 1e3:9.3f}{dec_m / dec:7.2f}"
        )
        figures |= {
            f"{name}_prefill_predicted_ms": pre * 1e3,
            f"{name}_prefill_measured_ms": pre_m * 1e3,
            f"{name}_decode_predicted_ms": dec * 1e3,
            f"{name}_decode_measured_ms": dec_m * 1e3,
        }
    prefill_gain = measured["fp32"][0] / measured["bf16"][0]
    decode_gain = measured["fp32"][1] / measured["bf16"][1]
    print(
        f"  bf16 over fp32, measured: prefill {prefill_gain:.2f}x faster (the matmul rates differ "
        f"{machine.bf16_tflops / machine.fp32_tflops:.2f}x), decode {decode_gain:.2f}x (half the bytes:\n"
        "  at most 2x; a model this small spends much of a decode step in per-operator overhead, which bf16\n"
        "  does not shrink)"
    )
    return figures | {"bf16_prefill_speedup": prefill_gain, "bf16_decode_speedup": decode_gain}


def measured_decode(config: DecoderConfig, machine: estimate.Hardware, prompt: int, new: int) -> dict:
    model = DecoderLM(config)
    context = prompt + new // 2
    pred = estimate.decode_latency(config, machine, 1, context, dtype="fp32")
    _decode_step_times(model, 4, 4)  # warm up
    _, measured = _decode_step_times(model, prompt, new)
    # the same depth and number of operations, with weights too small to matter: per-step overhead
    thin = DecoderLM(config.replace(d_model=32, n_head=2, n_kv_head=2, vocab_size=64, d_ff=32))
    _decode_step_times(thin, 4, 4)
    _, overhead = _decode_step_times(thin, prompt, new)
    ratio = measured / pred["seconds"]
    with torch.inference_mode():  # the rate at which torch's matrix-vector product reads these weights
        matvec = matvec_bandwidth([m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)])
    at_matvec = pred["bytes"] / matvec + overhead
    n = estimate.count_params(config)["total"]
    print(f"\nThe project's decoder LM ({n:,} parameters, fp32) decoding at batch 1 on this machine")
    print(
        f"  predicted: weights + KV cache {pred['bytes'] / 2**20:.1f} MiB / {machine.bandwidth_gbs:.1f} GB/s "
        f"= {pred['memory_s'] * 1e3:.2f} ms; compute {pred['flops'] / 1e6:.1f} MFLOP / "
        f"{machine.fp32_tflops * 1e3:.1f} GFLOP/s = {pred['compute_s'] * 1e3:.2f} ms -> {pred['bound']}-bound"
    )
    print(f"  measured:  {measured * 1e3:.2f} ms/token (fastest of {new}); measured/predicted {ratio:.2f}")
    print(
        f"  the gap: a model of the same {config.n_layer} layers with negligible weights takes "
        f"{overhead * 1e3:.2f} ms a step (Python and operator dispatch,\n  about 30 operators per layer); "
        f"prediction + that overhead = {(pred['seconds'] + overhead) * 1e3:.2f} ms "
        f"(measured: {measured / (pred['seconds'] + overhead):.2f}x that).\n  The rest: F.linear at batch 1 "
        f"reads this model's matrices at {matvec / 1e9:.1f} GB/s, {matvec / 1e9 / machine.bandwidth_gbs:.0%} "
        f"of the copy bandwidth (the BLAS's matrix-vector kernel, not the memory, sets the pace); at that "
        f"rate + the overhead: {at_matvec * 1e3:.2f} ms (measured: {measured / at_matvec:.2f}x that)"
    )
    figures = {
        "decode_predicted_ms": pred["seconds"] * 1e3,
        "decode_measured_ms": measured * 1e3,
        "decode_ratio": ratio,
        "decode_overhead_ms": overhead * 1e3,
        "decode_ratio_with_overhead": measured / (pred["seconds"] + overhead),
        "decode_matvec_bandwidth_gbs": matvec / 1e9,
        "decode_ratio_at_matvec_rate": measured / at_matvec,
        "decode_within_2x": bool(0.5 <= ratio <= 2.0),
    }
    threads = torch.get_num_threads()
    if threads > 1:  # each small matrix-vector product ends on a barrier of all threads
        torch.set_num_threads(1)
        try:
            bw1 = memory_bandwidth(256)
            _, one = _decode_step_times(model, prompt, new)
        finally:
            torch.set_num_threads(threads)
        pred1 = pred["bytes"] / bw1
        print(
            f"  on 1 thread instead of {threads}: {one * 1e3:.2f} ms/token against {pred1 * 1e3:.2f} ms "
            f"predicted from the 1-thread bandwidth {bw1 / 1e9:.1f} GB/s ({one / pred1:.2f}x).\n"
            "  Every operator of a decode step is small and ends on a barrier of all threads; when other\n"
            "  processes hold a core, that barrier waits for a thread to be scheduled again, so a busy\n"
            "  machine slows decode on several threads far more than on one."
        )
        figures |= {"decode_1thread_ms": one * 1e3, "decode_1thread_ratio": one / pred1}
    return figures


CONTEXT = 1024  # the measured LM's context


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--preset", default="small", choices=["small", "base", "large"], help="the project's LM"
    )
    tokens = int_between(1, CONTEXT)
    parser.add_argument(
        "--prompt",
        type=tokens,
        default=None,
        help="prompt tokens of the measured decode (default 64, quick 16)",
    )
    parser.add_argument(
        "--new", type=tokens, default=None, help="decode steps measured (default 64, quick 16)"
    )
    parser.add_argument(
        "--prefill",
        type=tokens,
        default=None,
        help="prompt tokens of the fp32/bf16 prefill comparison (default 256, quick: 64)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, prompt=(16, 64), new=(16, 64), prefill=(64, 256))
    config = DecoderConfig.preset(args.preset, vocab_size=8192, context_length=CONTEXT)
    if args.prompt + args.new > config.context_length:
        parser.error(
            f"--prompt {args.prompt} and --new {args.new} exceed the LM's context of "
            f"{config.context_length} tokens"
        )
    checks_done(args)

    machine = measure_machine("cpu", quick=args.quick)
    figures = {
        "machine_bandwidth_gbs": machine.bandwidth_gbs,
        "machine_fp32_gflops": machine.fp32_tflops * 1e3,
    }
    figures |= gpu_table("llama-2-7b", "llama-2-7b", 512, 512)
    figures |= gpu_table(config, f"decoder-{args.preset}", 512, 512)
    plot_roofline(os.path.join(args.out, "roofline.png"), "llama-2-7b", machine, 512)
    print(f"\nroofline plot: {os.path.join(args.out, 'roofline.png')}")
    figures |= measured_decode(config, machine, args.prompt, args.new)
    if cpu_bf16_native() or args.dtype == "bf16":
        figures |= dtype_comparison(config, machine, args.prefill, args.prompt, args.new)
    else:
        print(
            "\nno bf16 comparison: this CPU has no AVX512_BF16/AMX (torch would emulate bf16; "
            "--dtype bf16 forces it)"
        )
    return figures


if __name__ == "__main__":
    run_script(main)
