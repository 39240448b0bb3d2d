"""Section 7.3.1: compute requirements: FLOPs per token, 6·N·D training compute, serving rates.

With the estimators of ``common/estimate.py``:

1. forward FLOPs per token of the published models (Llama-2 7B/13B/70B, Mixtral 8x7B, DeepSeek-V3) at a
   1-token and a 4096-token context (MoE models count their active parameters only);
2. 6·N·D training compute of Llama-2 (2 trillion tokens, its paper's figure) and the A100-80GB GPU-hours
   it implies at a stated utilisation (MFU), beside the GPU-hours the Llama 2 paper reports;
3. days to train and tokens/s to serve on each GPU of the datasheet table at that utilisation, and on
   this machine, whose fp32/bf16 matmul FLOP/s the script measures;
4. for the project's decoder LM: a training step's time predicted from 6·N·tokens (plus attention) over
   the measured FLOP/s, beside the measured step time; where the CPU multiplies bf16 natively
   (AVX512_BF16 or AMX; or with ``--dtype bf16``) the same step under bf16 autocast beside it, predicted
   at the measured bf16 rate.

    python -m ch07_deployment.s7_3_1_compute_requirements
    python -m ch07_deployment.s7_3_1_compute_requirements --quick
"""

from __future__ import annotations

import time

import torch

from common import estimate
from common.env import cpu_bf16_native
from common.machine import measure_machine
from common.models.decoder import DecoderConfig, DecoderLM
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    float_between,
    int_between,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)
from common.training import autocast_for

PUBLISHED = ("llama-2-7b", "llama-2-13b", "llama-2-70b", "mixtral-8x7b", "deepseek-v3")
# Llama 2 paper (Touvron et al. 2023, Table 2): pretraining on 2.0T tokens took these A100-80GB GPU-hours
LLAMA2_GPU_HOURS = {"llama-2-7b": 184_320, "llama-2-13b": 368_640, "llama-2-70b": 1_720_320}
LLAMA2_TOKENS = 2 * 10**12


def flops_table() -> dict:
    print("\nForward FLOPs per token (GFLOP) at a context of 1 and 4096 tokens")
    figures = {}
    for name in PUBLISHED:
        p = estimate.count_params(name)
        f1, f4k = estimate.flops_per_token(name, 1), estimate.flops_per_token(name, 4096)
        print(f"  {name:14} active {p['active'] / 1e9:6.1f}B  {f1 / 1e9:8.1f}  {f4k / 1e9:8.1f}")
        figures[f"{name}_gflops_per_token"] = f1 / 1e9
    return figures


def llama2_training(mfu: float) -> dict:
    a100 = estimate.gpu("a100-80gb")
    print(f"\nLlama 2 pretraining, 6·N·D with D = 2T tokens, A100-80GB at {mfu:.0%} of its bf16 peak")
    figures = {}
    for name, published in LLAMA2_GPU_HOURS.items():
        flops = estimate.training_flops(name, LLAMA2_TOKENS)
        hours = flops / (a100.bf16_tflops * 1e12 * mfu) / 3600
        print(
            f"  {name:12} {flops:.2e} FLOPs -> {hours:12,.0f} GPU-hours (paper: {published:,}; "
            f"ratio {hours / published:.2f})"
        )
        figures[f"{name}_gpu_hours_est"] = hours
        figures[f"{name}_gpu_hours_ratio"] = hours / published
    return figures


def hardware_table(machine: estimate.Hardware, mfu: float, model: str = "llama-2-7b") -> dict:
    flops = estimate.training_flops(model, LLAMA2_TOKENS)
    per_token = estimate.flops_per_token(model, 1024)
    weights = estimate.weight_bytes(model, 16)
    print(
        f"\n{model} on each device at {mfu:.0%} utilisation (bf16): days to train on 2T tokens on one device,"
    )
    print("tokens/s to serve when compute-bound (large batch), and when memory-bound (batch 1)")
    print(
        f"  {'device':12}{'bf16 TFLOP/s':>14}{'GB/s':>8}{'days':>12}"
        f"{'tok/s compute':>15}{'tok/s batch 1':>15}"
    )
    figures = {}
    for hw in [*estimate.GPUS.values(), machine]:
        rate = hw.bf16_tflops * 1e12 * mfu
        days = flops / rate / 86400
        serve = rate / per_token
        batch1 = hw.bandwidth_gbs * 1e9 / weights
        print(
            f"  {hw.name:12}{hw.bf16_tflops:14.3g}{hw.bandwidth_gbs:8.0f}{days:12,.0f}"
            f"{serve:15,.1f}{batch1:15.2f}"
        )
        figures[f"{hw.name.replace(' ', '_')}_days"] = days
    return figures


def measured_step(
    config: DecoderConfig, batch: int, seq: int, machine: estimate.Hardware, steps: int, dtype: str = "fp32"
) -> dict:
    """A training step (AdamW) of the project's LM, fp32 or under bf16 autocast, against 6·N·D +
    attention at this machine's measured matmul rate for that dtype; figures prefixed with the dtype
    (none for fp32)."""
    torch.manual_seed(0)
    model = DecoderLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    times = []
    for _ in range(steps + 1):  # the first step allocates AdamW's state: not timed
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_for("cpu", dtype):
            _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    measured = min(times[1:])  # on a shared machine other processes only ever add time
    tokens = batch * seq
    d_qk, d_v = estimate.attention_width(config)
    # 6·N·tokens, plus attention (forward 2·layers·keys·(d_qk + d_v) per token, causal: keys ≈ seq/2; ×3)
    attn = 3 * 2 * config.n_layer * (seq / 2) * (d_qk + d_v) * tokens
    flops = estimate.training_flops(config, tokens) + attn
    predicted = flops / (machine.tflops(dtype) * 1e12)
    print(
        f"\nThe project's decoder LM ({estimate.count_params(config)['total']:,} parameters), "
        f"a training step of {batch}x{seq} tokens, {'fp32' if dtype == 'fp32' else f'{dtype} autocast'}:"
    )
    print(
        f"  6·N·D + attention = {flops:.3e} FLOPs; at the measured {machine.tflops(dtype) * 1e3:.1f} "
        f"{dtype} GFLOP/s"
    )
    print(f"  predicted {predicted * 1e3:.0f} ms, measured {measured * 1e3:.0f} ms (fastest of {steps})")
    print(
        f"  measured/predicted = {measured / predicted:.2f}: the step also runs the optimizer, norms, softmax"
        " and\n  element-wise work that 6·N·D leaves out, and its matmuls have other shapes than the"
        " square one timed"
    )
    prefix = "" if dtype == "fp32" else f"{dtype}_"
    return {
        f"{prefix}train_step_flops": flops,
        f"{prefix}train_step_predicted_s": predicted,
        f"{prefix}train_step_measured_s": measured,
        f"{prefix}train_step_ratio": measured / predicted,
        f"{prefix}achieved_gflops": flops / measured / 1e9,
    }


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--mfu",
        type=float_between(0, 1, low_open=True),
        default=0.4,
        help="model FLOPs utilisation assumed for the GPUs",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=["small", "base"],
        help="the project's LM size of the timed step (default small; quick: a 2-layer model of width 256)",
    )
    parser.add_argument(
        "--batch", type=count_int, default=None, help="training batch of the timed step (default 8, quick 4)"
    )
    parser.add_argument(
        "--seq",
        type=int_between(1, 1 << 16),
        default=None,
        help="sequence length of the timed step (default 256, quick 128)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="timed training steps (default 3, quick 2)"
    )
    args = parse_args(parser, argv)
    quick_or_full(args, batch=(4, 8), seq=(128, 256), steps=(2, 3))
    if args.preset is None and args.quick:
        config = DecoderConfig(
            vocab_size=4096, context_length=args.seq, n_layer=2, d_model=256, n_head=4, n_kv_head=4
        )
    else:
        config = DecoderConfig.preset(args.preset or "small", vocab_size=8192, context_length=args.seq)
    checks_done(args)

    machine = measure_machine("cpu", quick=args.quick)
    print(
        f"This machine (measured): fp32 {machine.fp32_tflops * 1e3:.1f} GFLOP/s, "
        f"bf16 {machine.bf16_tflops * 1e3:.1f} GFLOP/s (matmul), {machine.bandwidth_gbs:.1f} GB/s (copy)"
    )
    figures = {
        "machine_fp32_gflops": machine.fp32_tflops * 1e3,
        "machine_bf16_gflops": machine.bf16_tflops * 1e3,
    }
    figures |= flops_table()
    figures |= llama2_training(args.mfu)
    figures |= hardware_table(machine, args.mfu)
    figures |= measured_step(config, args.batch, args.seq, machine, args.steps)
    if cpu_bf16_native() or args.dtype == "bf16":  # beside fp32 where the CPU has bf16 (or when asked)
        figures |= measured_step(config, args.batch, args.seq, machine, args.steps, "bf16")
        speedup = figures["train_step_measured_s"] / figures["bf16_train_step_measured_s"]
        print(
            f"  bf16 autocast over fp32: the step is {speedup:.2f}x faster (the matmul rates differ "
            f"{machine.bf16_tflops / machine.fp32_tflops:.2f}x;\n  norms, softmax, the optimizer and the "
            "casts gain little or nothing)"
        )
        figures["bf16_train_step_speedup"] = speedup
    else:
        print(
            "\nno bf16 step: this CPU has no AVX512_BF16/AMX (torch would emulate bf16; "
            "--dtype bf16 forces it)"
        )
    return figures


if __name__ == "__main__":
    run_script(main)
