"""Quantised decoding speed: fp32 against 4-bit and 8-bit weights, plain and on torch's kernels.

    python -m benchmarks.bench_quant [--quick] [--json PATH] [--new-tokens N] [--repeats N]

Greedy decoding at batch 1 with the KV cache (:func:`common.models.generation.generate`), tokens per
second, on two models of the project's Llama-style architecture (RMSNorm, RoPE, SwiGLU, untied head):

* ``tiny``: the shape of the pretrained model chapter 7 compresses (4 layers, d_model 128, vocab
  2048; 5.5 MB in fp32, which sits in this CPU's last-level cache);
* ``base``: the ``base`` preset (12 layers, d_model 768, vocab 8192; about 390 MB in fp32, many
  times any CPU's last-level cache), where decoding reads its weights from memory at every token.

Both are untrained twins (random weights): the time of a forward does not depend on the weights'
values, and quality is measured on the trained model by the chapter 7 scripts.  The block linears
are quantised by round-to-nearest (the codes' format is GPTQ's and AWQ's: only the values differ):

* ``int4 QuantLinear``: 4 bits, groups of 128, :class:`common.quant.QuantLinear` (the plain path:
  dequantise the whole weight, then ``F.linear``);
* ``int4 kernel``: the same layers through :func:`common.quant_runtime.to_runtime`
  (``_weight_int4pack_mm_for_cpu``), activations in :func:`~common.quant_runtime.activation_dtype`
  (bf16 where the CPU has it), and once more with fp32 activations;
* ``int8 kernel``: 8 bits, one scale per row (``torch._weight_int8pack_mm``).

The contenders run interleaved, round after round (:func:`common.timing.race`); each ratio is the
median over rounds of fp32's time over the contender's in the same round.  Goals (tokens/s over
fp32's): the int4 kernel >= 1.0x on ``tiny`` and >= 2x on ``base``, the int8 kernel >= 1.5x on
``base``.  The JSON records the machine, the settings and every round.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common.env import environment_report, seed_everything
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate
from common.quant import pack_model, quantized_bytes, rtn_model
from common.quant_runtime import activation_dtype, summarize_paths, to_runtime
from common.runner import write_json
from common.timing import machine_record, paired_ratio, race

FORMAT = 1
ARCH = dict(norm="rmsnorm", pos="rope", ffn="swiglu", tie_embeddings=False, bias=False, dropout=0.0)
MODELS = {
    "tiny": dict(vocab_size=2048, context_length=128, n_layer=4, d_model=128, n_head=4, n_kv_head=4, **ARCH),
    "base": DecoderConfig.preset("base", vocab_size=8192, context_length=512, **ARCH).to_dict(),
}
QUICK_BASE = dict(n_layer=4)  # --quick: a shorter base model, still far beyond the cache
GOALS = {("tiny", "int4 kernel"): 1.0, ("base", "int4 kernel"): 2.0, ("base", "int8 kernel"): 1.5}
FP32, PLAIN, INT4, INT4_FP32, INT8 = (
    "fp32",
    "int4 QuantLinear",
    "int4 kernel",
    "int4 kernel, fp32 activations",
    "int8 kernel",
)


def contenders(model: DecoderLM, act_dtype: torch.dtype) -> tuple[dict, dict]:
    """The models to race, and what each is (bytes of its block linears, the paths its layers took)."""
    fake4, q4 = rtn_model(model, 4, 128)
    plain4 = pack_model(fake4, q4)
    fake8, q8 = rtn_model(model, 8, -1)
    plain8 = pack_model(fake8, q8)
    int4, paths4 = to_runtime(plain4, act_dtype)
    int4_fp32, _ = to_runtime(plain4, torch.float32)
    int8, paths8 = to_runtime(plain8, act_dtype)
    models = {FP32: model, PLAIN: plain4, INT4: int4, INT4_FP32: int4_fp32, INT8: int8}
    info = {
        "fp32_bytes": quantized_bytes(model),
        "int4_bytes": quantized_bytes(plain4),
        "int8_bytes": quantized_bytes(plain8),
        "int4_paths": summarize_paths(paths4),
        "int8_paths": summarize_paths(paths8),
    }
    return models, info


def bench_model(name: str, cfg: DecoderConfig, new_tokens: int, repeats: int, act_dtype, seed: int) -> dict:
    seed_everything(seed)
    model = DecoderLM(cfg).eval()
    models, info = contenders(model, act_dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed)).tolist()
    tokens = {k: generate(m, prompt, new_tokens)[0] for k, m in models.items()}
    times = race({k: (lambda m=m: generate(m, prompt, new_tokens)) for k, m in models.items()}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = {k: paired_ratio(times[FP32], times[k]) for k in models if k != FP32}
    agree = {
        k: sum(a == b for a, b in zip(tokens[k], tokens[PLAIN if "int4" in k else FP32])) / new_tokens
        for k in (INT4, INT4_FP32)
    }
    return {
        "model": name,
        "config": cfg.to_dict(),
        "params": model.num_params(),
        **info,
        "tokens_per_s": {k: new_tokens / t for k, t in med.items()},
        "speedup_over_fp32": speedup,
        "greedy_agreement_with_int4_plain": agree,
        "goals": {k: GOALS[(name, k)] for k in models if (name, k) in GOALS},
        "times": times,
    }


def table(results: list[dict]) -> str:
    """The markdown table the README shows: tokens/s and speed-up over fp32, per model and path."""
    names = [FP32, PLAIN, INT4, INT4_FP32, INT8]
    lines = [
        "| model | fp32 MB | fp32 tok/s | " + " | ".join(f"{n} tok/s (x fp32)" for n in names[1:]) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in results:
        cells = []
        for n in names:
            tps = r["tokens_per_s"][n]
            if n == FP32:
                cells.append(f"{tps:.0f}")
                continue
            x = r["speedup_over_fp32"][n]
            goal = r["goals"].get(n)
            mark = f", goal {goal:g}x {'met' if x >= goal else 'not met'}" if goal else ""
            cells.append(f"{tps:.0f} ({x:.2f}x{mark})")
        lines.append(
            f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['fp32_bytes'] / 1e6:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds, a shorter base model")
    parser.add_argument(
        "--json", default="benchmarks/results/bench_quant.json", help="where to write results"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per run (64; quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (5; quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and prompt")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (torch's choice)")
    args = parser.parse_args(argv)
    for flag in ("new_tokens", "repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    act = activation_dtype("cpu")
    env = environment_report()
    print(
        f"{env['cpu']}, {torch.get_num_threads()} threads; batch 1, prompt 16, {new_tokens} greedy tokens, "
        f"{repeats} interleaved rounds; kernel activations {str(act).removeprefix('torch.')}",
        flush=True,
    )
    results = []
    for name, fields in MODELS.items():
        cfg = DecoderConfig(**(fields | (QUICK_BASE if args.quick and name == "base" else {})))
        r = bench_model(name, cfg, new_tokens, repeats, act, args.seed)
        print(f"{name}: int4 layers: {r['int4_paths']}; int8 layers: {r['int8_paths']}", flush=True)
        results.append(r)
    print("\n" + table(results))
    payload = {
        "format": FORMAT,
        "quick": args.quick,
        "environment": machine_record(env, ()),
        "threads": torch.get_num_threads(),
        "settings": {
            "new_tokens": new_tokens,
            "prompt_tokens": 16,
            "repeats": repeats,
            "kernel_activation_dtype": str(act),
            "int4": "RTN 4 bits, groups of 128, block linears (embeddings and head fp32)",
            "int8": "RTN 8 bits, one scale per row, block linears",
            "weights": "random (an untrained twin of each shape): speed does not depend on the values",
        },
        "results": results,
    }
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
