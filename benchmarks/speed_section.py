"""Rewrite the speed sections of the chapter READMEs from the committed benchmark results.

    python -m benchmarks.speed_section            # after a new benchmarks/results/*.json
    python -m benchmarks.speed_section --check    # exit 1 if the README is not what the JSON gives

Every figure in the section comes from ``benchmarks/results/bench_decoder.json`` and
``bench_moe.json``: the tables as the benchmarks print them (:func:`bench_decoder.report`,
:func:`bench_moe.table`), the prose figures computed from the same results. The section runs from
its heading to the end of the README. In the chapter 6 README, the block between the
``<!-- bench_ep -->`` markers comes from ``bench_ep.json`` (:func:`bench_ep.table`); in chapter 7's,
the block between the ``<!-- bench_quant -->`` markers from ``bench_quant.json``
(:func:`bench_quant.table`). Results written by
an older version of a benchmark (their ``format`` is not the benchmark's ``FORMAT``) are refused with
the command that rewrites them.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path

from benchmarks import bench_decoder, bench_ep, bench_moe, bench_quant

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "ch04_transformer_moe" / "README.md"
HEADING = "## Speed (measured side by side in one run)"
EP_README = ROOT / "ch06_distributed_moe" / "README.md"
EP_BEGIN, EP_END = "<!-- bench_ep -->", "<!-- /bench_ep -->"
QUANT_README = ROOT / "ch07_deployment" / "README.md"
QUANT_BEGIN, QUANT_END = "<!-- bench_quant -->", "<!-- /bench_quant -->"


def _reflow(markdown: str, width: int = 100) -> str:
    """Wrap each prose paragraph to ``width`` (the figures make the template's lines ragged); fenced
    blocks stay as they are."""
    parts = re.split(r"(```\n.*?\n```)", markdown, flags=re.DOTALL)
    for i in range(0, len(parts), 2):  # even parts are prose
        paragraphs = parts[i].split("\n\n")
        parts[i] = "\n\n".join(
            textwrap.fill(" ".join(p.split()), width, break_long_words=False, break_on_hyphens=False)
            if p.strip() and not p.lstrip().startswith("#")
            else p
            for p in paragraphs
        )
    return "".join(parts).rstrip("\n") + "\n"


def section(dec: dict, moe: dict) -> str:
    """The section's markdown from the two benchmarks' JSON."""
    env, goals, r = moe["environment"], dec["goals"], dec["ratios"]
    floor = dec["train_step_x_floor"]
    decode = next(res for res in moe["results"] if not res["config"]["train"])
    fine, coarse = sorted(
        (res for res in moe["results"] if res["config"]["train"]), key=lambda res: -res["config"]["experts"]
    )
    tr, de, co = fine["x_floor"], decode["x_floor"], coarse["x_floor"]
    settings = {**fine["settings"], **decode["settings"], **coarse["settings"]}
    vs_hf = fine["measured"]["x_hf"]
    one, cm, rb = decode["one_thread"], bench_moe.COLUMN_MAJOR, "read active weights"
    return _reflow(f"""{HEADING}

Both benchmarks time our code and the named alternative in the same process, alternating them
(so that load from elsewhere hits both alike), on the same weights, and write every repeat to JSON
under [`benchmarks/results/`](../benchmarks/results/). Each library runs with the settings its users
get by default, recorded in the JSON. Figures below: {env["cores"]} cores {env["cpu"]}, torch
{env["torch"]}, transformers {env["transformers"]}, deepspeed {env["deepspeed"]}, {moe["threads"]}
threads; absolute times hold only for that machine. Allocator: {dec["malloc"]} (decoder),
{moe["malloc"]} (MoE): by default the benchmarks opt in to `common.env.keep_freed_memory` (without it
every tensor over 32 MiB is a fresh `mmap` and pays a page fault per 4 KiB page), and
`--system-malloc` leaves glibc's defaults. Every ratio is the median over
the rounds of the two times measured in the same round. `python -m benchmarks.speed_section`
rebuilds this section from the JSON.

**Decoder LM** (`python -m benchmarks.bench_decoder --repeats {dec["repeats"]}`): our KV-cache `generate`
against `LlamaForCausalLM.generate` (its defaults, attention
`{dec["hf_settings"]["attn_implementation"]}`) and against our own decoding without the cache; a
training step against `LlamaForCausalLM` with the same weights and AdamW, and against the step's
floor; and the loss head alone, full logits + `F.cross_entropy` (what `DecoderLM` computes by default)
against the chunked fused linear + cross-entropy of `common/models/fused_cross_entropy.py`
(`DecoderLM(idx, targets, fused_loss=True)`).

```
{bench_decoder.report(dec)}
```

A decode step multiplies one row by every weight matrix, so its time is the time to stream the
{dec["weight_matrix_mb"]:.0f} MB of weight matrices from memory (the embedding table is only looked up).
`generate` reads the weights as the model holds them and changes nothing in the model; torch's
matrix-vector product streams `nn.Linear`'s row-major (out, in) weights well below the memory
bandwidth, so the opt-in `DecodeLayout(model)` (`common/models/decode_layout.py`) holds column-major
copies apart from the model ({dec["column_major_copy_mb"]:.0f} MB more memory) and runs the model's
own forward with them. Goals, on that copy: at least {goals["decode_vs_hf"]:g}x the tokens/s of HF
`generate` (measured {r["decode_vs_hf"]:.2f}x; plain `generate`
{dec["plain_generate_ratios"]["decode_vs_hf"]:.2f}x) and {goals["decode_vs_no_cache"]:g}x of no cache
({r["decode_vs_no_cache"]:.2f}x; plain {dec["plain_generate_ratios"]["decode_vs_no_cache"]:.2f}x); a
training step no slower
than HF's (HF's time over ours: {r["train_step_vs_hf"]:.2f}x) and within {dec["train_x_floor_goal"]:g}x
its floor ({floor["ours"]:.2f}x). The floor is the same matrix multiplies (forward, input and weight
gradients, head included), causal attention and AdamW step, run bare on preallocated outputs; HF's
step costs {floor["hf"]:.2f}x that floor.

**MoE layer** (`python -m benchmarks.bench_moe --repeats {moe["repeats"]}`): our `TopKMoE` (Mixtral
routing) and `DeepSeekMoE` against transformers' `MixtralSparseMoeBlock` and `DeepseekV3MoE` (weights
loaded into ours with `from_hf`) and DeepSpeed's `MoE` (ep_size 1) at several capacity factors, as
multiples of the floor: one dense SwiGLU over `tokens x k` rows with the same active FLOPs, no routing.
`read active weights` only reads the weights of the experts a decode step picks: no implementation
can beat it.

```
{bench_moe.table(moe["results"])}
```

The transformers columns are the blocks of models built normally: {settings["HF Mixtral"]}; the
`eager` columns run the same weights on transformers' per-expert loop and are shown for comparison
only. Against the default Mixtral block, ours takes {vs_hf:.2f}x its time on fine-grained training
(goal: at most {fine["config"]["goals"]["x_hf"]:g}x); over the floor, ours and HF's default block take
{co["ours"]:.2f}x and {co["HF Mixtral"]:.2f}x on coarse training, {de["ours"]:.2f}x and
{de["HF Mixtral"]:.2f}x when decoding. Goals (ours as a multiple of the floor):
fine-grained training at most {fine["config"]["goals"]["x_floor"]:g}x (measured {tr["ours"]:.2f}x),
coarse training {coarse["config"]["goals"]["x_floor"]:g}x ({co["ours"]:.2f}x). Decoding
{decode["config"]["tokens"]} tokens must stream the {decode["active_experts"]} chosen experts' weights
({decode["active_weight_mb"]:.0f} MB) from memory; reading them once costs {de["read active weights"]:.2f}x
the floor (whose one expert stays in cache), and ours takes {decode["plain_ours_x_bound"]:.2f}x that
bound, {decode["measured"]["x_bound"]:.2f}x with column-major copies of the expert weights held apart
(`DecodeLayout`, {decode["column_major_copy_mb"]:.1f} MB more; goal: at most
{decode["config"]["goals"]["x_bound"]:g}x). On one thread the step takes
{1e3 * one["median_s"][cm]:.1f} ms ({1e3 * decode["median_s"][cm]:.1f} ms on {moe["threads"]}) and the
bound {1e3 * one["median_s"][rb]:.1f} ms ({1e3 * decode["median_s"][rb]:.1f} ms), {one["x_bound"]:.2f}x:
what stands between ours and the bound is not the threads but the
products themselves, {decode["active_experts"]} experts' pairs of matrix products over one or two rows
each, which torch's BLAS runs well below the rate at which the same weights are simply read.
""")


def ep_block(ep: dict) -> str:
    """The chapter 6 README's figures from ``bench_ep.json``."""
    env, ds = ep["environment"], ep["settings"]["DeepSpeed"]
    workers = sorted({r["ep_threads_per_worker"] for r in ep["results"]})
    return (
        _reflow(f"""Measured on {env["cores"]} cores {env["cpu"]}, torch {env["torch"]}, deepspeed
{env["deepspeed"]}: {ep["threads"]} threads in the one-process runs, {", ".join(map(str, workers))} per
worker in the two-process runs, {ep["repeats"]} rounds (`python -m benchmarks.bench_ep --repeats
{ep["repeats"]}`); absolute times hold only for that machine. DeepSpeed: `deepspeed.moe.layer.MoE` with
its defaults (capacity factor {ds["capacity_factor"]:g}, `min_capacity` {ds["min_capacity"]},
`drop_tokens` {ds["drop_tokens"]}), `ep_size` 2 over gloo: each expert takes a fixed number of slots of
each worker's tokens, over-capacity tokens are dropped and the rest padded. The goal compares ours at
that same capacity (`GShardGate` at the rate that gives DeepSpeed's slots per expert, unpadded); with
fastmoe's default `NaiveGate` nothing is dropped, and the worker whose experts are busiest computes
more rows than DeepSpeed's fixed share.

""")
        + "\n"
        + bench_ep.table(ep["results"])
        + "\n"
    )


def quant_block(q: dict) -> str:
    """The chapter 7 README's quantised-decoding figures from ``bench_quant.json``."""
    env, st = q["environment"], q["settings"]
    tiny, base = (next(r for r in q["results"] if r["model"] == name) for name in ("tiny", "base"))
    act = st["kernel_activation_dtype"].removeprefix("torch.")
    return (
        _reflow(f"""Measured on {env["cores"]} cores {env["cpu"]}, torch {env["torch"]}, {q["threads"]}
threads (`python -m benchmarks.bench_quant --repeats {st["repeats"]}`): greedy decoding at batch 1,
{st["prompt_tokens"]}-token prompt, {st["new_tokens"]} new tokens, {st["repeats"]} interleaved rounds, the
ratio the median of per-round ratios to fp32's time; weights {st["weights"]}. int4: {st["int4"]}; int8:
{st["int8"]}. The kernels ran with {act} activations (this CPU has them); the fp32-activation column
is what a CPU without bf16 gets. On `tiny` the layers are small enough that a call's fixed cost
weighs as much as its bytes; on `base` ({base["fp32_bytes"] / 1e6:.0f} MB of fp32 weights, beyond
any last-level cache) decoding reads the weights from memory at every token, and the int4 model's
{base["int4_bytes"] / 1e6:.0f} MB (embeddings and output head still fp32) decode
{base["speedup_over_fp32"]["int4 kernel"]:.2f}x faster than fp32. The kernel's greedy tokens agree
with the plain int4 path's on {tiny["greedy_agreement_with_int4_plain"]["int4 kernel"]:.0%} (tiny)
and {base["greedy_agreement_with_int4_plain"]["int4 kernel"]:.0%} (base) of the steps: bf16
activations round differently, and random weights leave many logits within that rounding of each
other, so one flipped step changes the rest (on the trained model, `s7_3_3_single_gpu_70b` reports
the agreement).

""")
        + "\n"
        + bench_quant.table(q["results"])
        + "\n"
    )


def _replace_block(path: Path, begin: str, end: str, block: str) -> tuple[str, str]:
    """``(old text, new text)`` of ``path`` with the lines between the markers replaced by ``block``."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return text, f"{head}{begin}\n{block}{end}{tail}"


def _load(bench) -> dict | None:
    """A benchmark's committed results, or None (and the command that writes them)."""
    name = bench.__name__.rsplit(".", 1)[1]
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {}
    if payload.get("format") != bench.FORMAT:
        why = "predates this benchmark's format" if payload else "is missing"
        print(f"benchmarks/results/{name}.json {why}: run python -m benchmarks.{name}")
        return None
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is stale")
    args = parser.parse_args(argv)
    payloads = {bench: _load(bench) for bench in (bench_decoder, bench_moe, bench_ep, bench_quant)}
    if None in payloads.values():
        return 1
    updates = {}
    text = README.read_text()
    if HEADING not in text:
        raise SystemExit(f"{README} lacks the heading {HEADING!r}")
    dec, moe = payloads[bench_decoder], payloads[bench_moe]
    updates[README] = text, text[: text.index(HEADING)] + section(dec, moe)
    updates[EP_README] = _replace_block(EP_README, EP_BEGIN, EP_END, ep_block(payloads[bench_ep]))
    updates[QUANT_README] = _replace_block(
        QUANT_README, QUANT_BEGIN, QUANT_END, quant_block(payloads[bench_quant])
    )
    stale = [path for path, (old, new) in updates.items() if old != new]
    if not stale:
        print("the speed sections match the benchmark results")
        return 0
    for path in stale:
        if args.check:
            print(f"stale: the speed section of {path.relative_to(ROOT)}")
        else:
            path.write_text(updates[path][1])
            print(f"rewritten: the speed section of {path.relative_to(ROOT)}")
    return 1 if args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
