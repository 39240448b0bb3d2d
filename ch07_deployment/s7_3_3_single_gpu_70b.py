"""Section 7.3.3: deploying LLaMA-70B on one GPU: which precision fits which card, and the same path run.

Part 1 plans from the config alone (:mod:`common.estimate`): the weights of Llama-2-70B at 16, 8 and
4 bits (group 128, with its scales and zeros), for each GPU of the datasheet table whether they fit, the
memory left for the KV cache, and how many tokens of context that cache holds at batch 1.  The book says
an RTX 4060 (8 GB) runs 70B at 4 bits; its weights alone are about 35 GB, so it cannot: the script says
so (and ERRATA.md records it).

Part 2 runs the same path for real on the project's LM (or ``--hf-path DIR``, a local Llama folder):
GPTQ to 4 bits, pack to int4 (:class:`common.quant.QuantLinear`), save as safetensors + JSON, load back,
check the loaded model's logits equal the packed one's, generate greedily, and time decoding beside the
fp32 model, interleaved round after round.  Two 4-bit paths run: the plain one a reader opens
(:class:`~common.quant.QuantLinear` dequantises its whole weight and calls ``F.linear``, which on a CPU
costs more than the 4x fewer bytes save) and the runtime one (:func:`common.quant_runtime.to_runtime`:
torch's int4 kernel dequantises inside its tiles, activations in bf16 where the CPU has it), whose
speed the figures report; it decodes the same greedy tokens within bf16's rounding.  With ``--dtype bf16``
the race also decodes with the float model's weights in bf16 (half fp32's bytes), the 16-bit precision
of part 1's table.

    python -m ch07_deployment.s7_3_3_single_gpu_70b
    python -m ch07_deployment.s7_3_3_single_gpu_70b --quick
"""

from __future__ import annotations

import copy
import os
import statistics

import torch

from common import estimate
from common.env import torch_dtype
from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.model_files import path_bytes
from common.models.generation import decode_room_problem, generate
from common.quant import (
    load_quantized,
    pack_model,
    quantize_model,
    save_quantized,
)
from common.quant_runtime import summarize_paths, to_runtime
from common.runner import (
    add_dtype_flag,
    checks_done,
    group_size_int,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)
from common.timing import paired_ratio, race

BOOK_GPU = "rtx-4060"


def plan(preset: str) -> tuple[list[dict], dict]:
    """For each precision and GPU: weights, fit, memory left and the context the KV cache can hold."""
    config = estimate.preset_config(preset)
    rows = estimate.deployment_plan(config)  # one GPU
    kv_per_token = estimate.kv_cache_bytes(config, batch=1, seq_len=1)  # fp16 keys and values
    return rows, {"kv_bytes_per_token": kv_per_token, "params": estimate.count_params(config)["total"]}


@torch.no_grad()
def decode_race(models: dict, prompt: list[int], n_new: int, repeats: int) -> tuple[dict, dict, dict]:
    """Greedy generation of ``n_new`` tokens (KV cache on) by every model, interleaved over ``repeats``
    rounds: ``(tokens/s (median), speed over the first model's (median of per-round ratios), tokens)``."""
    tokens = {k: generate(m, [prompt], n_new)[0] for k, m in models.items()}
    times = race({k: (lambda m=m: generate(m, [prompt], n_new)) for k, m in models.items()}, repeats)
    first = next(iter(models))
    rates = {k: n_new / statistics.median(t) for k, t in times.items()}
    return rates, {k: paired_ratio(times[first], t) for k, t in times.items()}, tokens


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument(
        "--preset",
        default="llama-2-70b",
        choices=sorted(estimate.PRESETS),
        help="the model to plan for (common.estimate)",
    )
    parser.add_argument(
        "--group-size",
        type=group_size_int,
        default=None,
        help="GPTQ group size, -1: per row (128; quick: 32)",
    )
    parser.add_argument(
        "--calib-samples", type=positive_int, default=None, help="GPTQ calibration windows (32; quick: 8)"
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="greedy tokens to generate and time (64; quick: 16)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="interleaved timed rounds of every model, median (3; quick: 1)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, group_size=(32, 128), calib_samples=(8, 32), new_tokens=(16, 64), repeats=(1, 3))
    source, model, windows = load_for_compression(parser, args, "4-bit deployment", bits=(4,))
    problem = decode_room_problem(
        [source.data.val[:8].tolist()], args.new_tokens, model.config.context_length
    )
    if problem:
        parser.error(f"--new-tokens {args.new_tokens}: {problem}")
    checks_done(args)

    rows, info = plan(args.preset)
    print(
        f"{args.preset}: {info['params'] / 1e9:.1f} B parameters; KV cache "
        f"{info['kv_bytes_per_token'] / 1e6:.3f} MB per token (fp16); 'KV tokens': what the rest holds; "
        "GB are 10^9 bytes, 'GPU GB' what the card reports (an '80 GB' A100 has 80 GiB = 85.9 GB)\n"
    )
    print(
        f"{'precision':10} {'gpu':10} {'weights GB':>10} {'GPU GB':>7} {'fits':>5} {'left GB':>8} "
        f"{'KV tokens':>9}"
    )
    for r in rows:
        print(
            f"{r['precision']:10} {r['gpu']:10} {r['weights_gb']:10.1f} {r['memory_gb']:7.1f} "
            f"{'yes' if r['fits'] else 'no':>5} {r['left_gb']:8.1f} {r['context_tokens']:9,}"
        )
    book = next(r for r in rows if r["gpu"] == BOOK_GPU and r["precision"] == "int4 g128")
    print(
        f"\nthe book runs {args.preset} at 4 bits on an RTX 4060 (8 GB): the int4 weights alone are "
        f"{book['weights_gb']:.1f} GB, {book['weights_gb'] / book['memory_gb']:.1f}x its memory; it does not "
        "fit (see ERRATA.md). Cards of the table that hold them: "
        + ", ".join(r["gpu"] for r in rows if r["precision"] == "int4 g128" and r["fits"])
    )

    # Part 2: the path executed on a model we have (loaded and checked before part 1)
    fake, qweights, seconds = quantize_model(model, "gptq", 4, args.group_size, windows)
    packed = pack_model(fake, qweights)
    folder = os.path.join(args.out, "int4")
    save_quantized(packed, folder, {"method": "gptq", "bits": 4, "group_size": args.group_size})
    loaded, _ = load_quantized(folder)
    probe = source.data.val[: model.config.context_length // 2][None]  # (1, seq)
    with torch.no_grad():
        same_logits = torch.equal(loaded(probe)[0], packed(probe)[0])
    fp_eval = evaluate_lm(model, source.data, batch_size=16, max_batches=4 if args.quick else 16)
    q_eval = evaluate_lm(loaded, source.data, batch_size=16, max_batches=4 if args.quick else 16)
    prompt = source.data.val[:8].tolist()
    fast, paths = to_runtime(loaded)  # a copy on torch's int4 kernel; `loaded` stays the plain model
    racers = {"fp32": model, "int4 kernel": fast, "int4 QuantLinear": loaded}
    if args.dtype != "fp32":  # a 16-bit copy of the float model beside them
        racers[args.dtype] = copy.deepcopy(model).to(torch_dtype(args.dtype))
    rates, speed, tokens = decode_race(racers, prompt, args.new_tokens, args.repeats)
    q_tokens = tokens["int4 QuantLinear"]
    disk = path_bytes(folder)

    def agreement(a, b):
        return sum(x == y for x, y in zip(tokens[a], tokens[b])) / max(len(tokens[a]), 1)

    agree, kernel_agree = agreement("fp32", "int4 QuantLinear"), agreement("int4 kernel", "int4 QuantLinear")
    print(
        f"\n{source.describe()}: GPTQ int4 g{args.group_size} in {seconds:.1f} s, saved to {folder} "
        f"({disk / 1e6:.2f} MB), loaded back: logits {'identical' if same_logits else 'DIFFERENT'}"
    )
    print(f"perplexity fp32 {fp_eval['ppl']:.3f}, int4 {q_eval['ppl']:.3f}")
    print(f"prompt: {source.decode(prompt)!r}\nint4 continues: {source.decode(q_tokens)!r}")
    print(f"int4 runtime path: {summarize_paths(paths)}")
    print(
        f"greedy decoding ({args.repeats} interleaved rounds): fp32 {rates['fp32']:.0f} tokens/s, "
        f"int4 kernel {rates['int4 kernel']:.0f} ({speed['int4 kernel']:.2f}x fp32), plain int4 QuantLinear "
        f"{rates['int4 QuantLinear']:.0f} ({speed['int4 QuantLinear']:.2f}x); int4 and fp32 agree on "
        f"{agree:.0%} of the greedy tokens, the kernel and the plain int4 path on {kernel_agree:.0%}"
    )
    half = {}
    if args.dtype != "fp32":
        d = args.dtype
        print(
            f"{d} weights: {rates[d]:.0f} tokens/s ({speed[d]:.2f}x fp32), agreeing with fp32 on "
            f"{agreement('fp32', d):.0%} of the greedy tokens"
        )
        half = {
            f"{d}_decode_tokens_per_s": rates[d],
            f"{d}_over_fp32_decode": speed[d],
            f"{d}_fp32_token_agreement": agreement("fp32", d),
        }
    print(
        "the plain int4 layer dequantises its whole weight (unpack, subtract zeros, scale) before every "
        "matmul, which on a CPU costs more than reading 4x fewer bytes saves; the kernel dequantises inside "
        "its tiles, as GPU kernels do"
    )
    return {
        "preset": args.preset,
        "preset_params": info["params"],
        "int4_weights_gb": book["weights_gb"],
        "book_gpu_memory_gb": book["memory_gb"],
        "int4_fits_book_gpu": book["fits"],
        "kv_bytes_per_token": info["kv_bytes_per_token"],
        "quant_seconds": seconds,
        "int4_file_bytes": disk,
        "loaded_logits_identical": same_logits,
        "fp32_ppl": fp_eval["ppl"],
        "int4_ppl": q_eval["ppl"],
        "fp32_decode_tokens_per_s": rates["fp32"],
        "int4_decode_tokens_per_s": rates["int4 kernel"],
        "int4_over_fp32_decode": speed["int4 kernel"],
        "int4_plain_decode_tokens_per_s": rates["int4 QuantLinear"],
        "int4_plain_over_fp32_decode": speed["int4 QuantLinear"],
        "int4_runtime_paths": summarize_paths(paths),
        "greedy_token_agreement": agree,
        "kernel_plain_token_agreement": kernel_agree,
        **half,
    }


if __name__ == "__main__":
    run_script(main)
