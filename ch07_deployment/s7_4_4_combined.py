"""Section 7.4.4: the compressions of chapter 7.4 side by side, and combined, on one trained LM: size on
disk, latency and perplexity in one table and one plot.

Variants of the project's pretrained LM (``--model tiny``; ``--hf-path DIR`` for a local Llama folder):

- ``fp32``: the model as trained;
- ``torch_int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear`` (output head
  included), int8 weights, activations quantised on the fly, as PyTorch ships it;
- ``ort_int8``: the model exported to ONNX (:func:`common.onnx_export.export_decoder`) and quantised by
  ``onnxruntime.quantization.quantize_dynamic`` with its defaults (and ``reduce_range`` on x86 without
  VNNI, as onnxruntime advises), run by onnxruntime;
- ``gptq4`` and ``awq4``: 4-bit weights, groups of 128 columns, on every block linear (embeddings and
  head stay fp32), packed two per byte in :class:`common.quant.QuantLinear` (``common/quant.py``), run
  on torch's int4 kernel (:func:`common.quant_runtime.to_runtime`, bf16 activations where the CPU has
  them), the plain QuantLinear path timed beside it;
- ``pruned50``: structured pruning, half of every feed-forward layer's neurons removed (the lowest by
  activation score on the calibration windows, :func:`common.prune.activation_scores`), so the matrices
  really shrink (:func:`common.prune.prune_model`); no fine-tuning afterwards;
- ``distilled``: a student of half the teacher's layers at its width, distilled from it
  (:mod:`common.distill`, ``T²·KL + CE``) for ``--distil-steps`` steps (under autocast to ``--dtype``;
  every variant is timed and saved as the table says);
- ``distilled_gptq4`` and ``pruned50_gptq4``: those two quantised by GPTQ to 4 bits.  A pruned
  feed-forward layer keeps half its neurons (192 of 384 in the tiny model), which groups of 128 do not
  divide: the pruned model is quantised with the largest group that divides every width (64 there),
  and the script says so.

Size on disk: each variant written to ``--out`` in its real format and its files measured: safetensors
for the float and the 4-bit models (a 4-bit folder adds its JSON config, with a pruned model's per-layer
shapes, so :func:`common.quant.load_quantized` rebuilds every one; its safetensors hold the packed
codes, fp32 scales, uint8 zeros and the column-to-group index beside the fp32 embeddings, head and
norms); for PyTorch's int8 model its ``state_dict`` by ``torch.save`` (safetensors cannot hold torch's
quantised tensors; it loads back with ``weights_only=True``); the quantised ``.onnx`` file (and any
external data file it names) for onnxruntime. The pruned fp32 file holds exactly the remaining tensors
and, in its header's metadata, the per-layer widths from which :func:`common.prune.pruned_like` rebuilds
the model to load them into.

Latency: one forward of a single sequence of the full context (batch 1, ``--seq-len`` tokens, the
prefill of a prompt), the same for every variant, since the ONNX graph has no KV cache and so cannot
decode token by token on equal terms.  All variants run in one process, round after round interleaved
(:func:`common.timing.race`); the figure is the median over rounds of the variant's time over fp32's in
the same round.  onnxruntime runs with its default threads and graph optimisations (idle threads not
spinning, so they do not take the cores from PyTorch's turn); PyTorch with its default threads.

    python -m ch07_deployment.s7_4_4_combined
    python -m ch07_deployment.s7_4_4_combined --quick

What to look for: int8 costs almost no perplexity; onnxruntime's int8 file quantises the embedding table
too (its Gather), where PyTorch's keeps it fp32; the 4-bit files stay near half of fp32 on a model this
small because its fp32 embeddings and output head, unquantised as in the GPTQ and AWQ papers, are over a
third of its weights; the plain dequantise-then-matmul ``QuantLinear`` is slower than fp32 on a CPU (it
unpacks and rescales the whole weight on every call), torch's int4 kernel dequantises inside its tiles
as GPU kernels do; removing half the feed-forward
neurons without retraining, or a short distillation, costs far more perplexity than quantising, and
quantising the pruned or distilled model adds little to that cost while stacking the two savings.
PyTorch marks ``torch.ao.quantization`` deprecated in favour of torchao; it still ships, and its
warnings are left to show.  The short distillation keeps no checkpoint (``--distil-steps`` steps of a
small student, seconds; 7.4.3's students are the ones that resume).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from common.calibration import block_linears
from common.distill import lm_batches, lm_logits, student_config, train_student
from common.env import require_onnx_stack
from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.model_files import onnx_bytes, path_bytes, save_safetensors, save_state_dict
from common.onnx_export import OrtDecoder, OrtLM, export_decoder, quantize_dynamic_int8
from common.plotting import pyplot, save_figure
from common.prune import activation_scores, lowest_per_layer, prune_model
from common.quant import pack_model, quantize_model, save_quantized
from common.quant_runtime import summarize_paths, to_runtime
from common.runner import (
    add_dtype_flag,
    checks_done,
    float_between,
    group_size_int,
    int_between,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    unit_float,
    width_int,
)
from common.timing import paired_ratio, race

VARIANTS = {
    "fp32": "fp32",
    "torch_int8": "int8 dynamic (torch)",
    "ort_int8": "int8 dynamic (onnxruntime)",
    "gptq4": "GPTQ 4-bit",
    "awq4": "AWQ 4-bit",
    "pruned50": "50% FFN pruned",
    "distilled": "distilled",
    "distilled_gptq4": "distilled + GPTQ 4-bit",
    "pruned50_gptq4": "pruned + GPTQ 4-bit",
}


@dataclass
class Variant:
    """One compressed model: ``model(idx) -> (logits, None)``, its bytes on disk and what they hold."""

    model: nn.Module
    bytes: int
    stored: str
    params: int | None = None  # parameters of a float model (None where weights are not parameters)
    plain: nn.Module | None = None  # a 4-bit model's plain QuantLinear path (``model`` runs the kernel)
    paths: str = ""  # which path a 4-bit model's layers took (common.quant_runtime.summarize_paths)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def float_variant(model: nn.Module, folder: str) -> Variant:
    """A float model saved as safetensors; a pruned one with its per-layer shapes in the file's metadata."""
    metadata = (
        {"layer_shapes": json.dumps(model.shape_summary())} if hasattr(model, "shape_summary") else None
    )
    return Variant(model, save_safetensors(model, folder, metadata), "safetensors, fp32", n_params(model))


def torch_int8(model: nn.Module, folder: str) -> Variant:
    """PyTorch's dynamic int8 quantisation of every nn.Linear (a copy), saved as its state_dict."""
    qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    size = save_state_dict(qmodel.state_dict(), folder)
    return Variant(qmodel.eval(), size, "torch.save state_dict: int8 linears, fp32 embedding")


def ort_int8(model: nn.Module, folder: str) -> tuple[Variant, dict]:
    """The model exported to ONNX and quantised by onnxruntime's ``quantize_dynamic`` (its defaults, and
    the reduced range it advises on x86 without VNNI: :func:`common.onnx_export.quantize_dynamic_int8`)."""
    fp_path, q_path = os.path.join(folder, "lm.onnx"), os.path.join(folder, "lm.int8.onnx")
    info = export_decoder(model, fp_path)
    info |= quantize_dynamic_int8(fp_path, q_path)
    session = OrtLM(q_path, providers=["CPUExecutionProvider"], spinning=False)
    info["fp32_onnx_bytes"] = onnx_bytes(fp_path)
    return Variant(OrtDecoder(session), onnx_bytes(q_path), ".onnx, int8 weights (ORT defaults)"), info


def fitting_group(model: nn.Module, group_size: int) -> int:
    """The largest group width that divides ``group_size`` and every block linear's input width."""
    if group_size == -1:
        return -1
    widths = [lin.in_features for block in model.blocks for _, lin in block_linears(block)]
    return math.gcd(group_size, *widths)


def four_bit(model: nn.Module, method: str, group_size: int, windows, folder: str) -> Variant:
    """``method`` ("gptq", "awq") at 4 bits with its default settings, packed into QuantLinear layers and
    saved; it runs on torch's int4 kernel (:func:`common.quant_runtime.to_runtime`), the plain path kept
    beside it."""
    fake, qweights, seconds = quantize_model(model, method, 4, group_size, windows, True)
    packed = pack_model(fake, qweights).eval()
    settings = {"method": method, "bits": 4, "group_size": group_size, "seconds": seconds}
    size = path_bytes(save_quantized(packed, folder, settings))
    fast, paths = to_runtime(packed)
    stored = f"safetensors + JSON, int4 g{group_size} block linears"
    return Variant(fast.eval(), size, stored, plain=packed, paths=summarize_paths(paths))


def prune_ffn(model: nn.Module, windows, fraction: float) -> nn.Module:
    """A copy of ``model`` without the ``fraction`` least active feed-forward neurons of every layer."""
    _, neurons = activation_scores(model, windows.split(16))
    return prune_model(model, neurons=lowest_per_layer(neurons, fraction)).eval()


def distil(teacher: nn.Module, config, data, args) -> nn.Module:
    """A smaller student (``config``) distilled from ``teacher``."""
    from common.models.decoder import DecoderLM

    torch.manual_seed(args.seed)
    student = DecoderLM(config)
    batches = lm_batches(data, args.distil_steps, args.batch_size, args.seed + 1)
    train_student(
        student,
        teacher,
        batches,
        args.distil_steps,
        args.lr,
        args.temperature,
        args.alpha,
        lm_logits,
        "distil",
        dtype=args.dtype,
    )
    return student.eval()


def plot(path: str, rows: dict, title: str) -> str:
    """Perplexity against size on disk (left) and against latency relative to fp32 (right); each variant
    one point with its own colour and marker, named in the legend."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for i, (key, r) in enumerate(rows.items()):
        style = dict(s=55, color=f"C{i}", marker="osD^v<>ph"[i % 9], zorder=3, label=VARIANTS[key])
        axes[0].scatter([r["bytes"] / 1e6], [r["ppl"]], **style)
        axes[1].scatter([r["latency_ratio"]], [r["ppl"]], **style)
    axes[0].set(xlabel="size on disk (MB)", ylabel="validation perplexity", title=title)
    axes[1].set(xlabel="latency, batch 1, relative to fp32 (median of interleaved rounds)")
    axes[1].axvline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument(
        "--group-size",
        type=group_size_int,
        default=None,
        help="4-bit group width, -1: per row (128; quick: 32)",
    )
    parser.add_argument(
        "--calib-samples", type=positive_int, default=None, help="calibration windows (64; quick: 16)"
    )
    parser.add_argument(
        "--prune",
        type=float_between(0, 1, low_open=True, high_open=True),
        default=0.5,
        help="fraction of feed-forward neurons removed",
    )
    parser.add_argument(
        "--distil-steps",
        type=int_between(1, 100_000),  # every step's batch is drawn before training
        default=None,
        help="student training steps (300; quick: 40)",
    )
    parser.add_argument(
        "--batch-size",
        type=int_between(1, 4096),
        default=None,
        help="sequences per distillation step (16; quick: 8)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3, help="student AdamW learning rate, linear decay"
    )
    parser.add_argument("--temperature", type=positive_float, default=2.0, help="distillation temperature T")
    parser.add_argument("--alpha", type=unit_float, default=0.5, help="weight of the soft (KL) term")
    parser.add_argument(
        "--student-layers", type=int_between(1, 1024), default=None, help="student depth (half the teacher's)"
    )
    parser.add_argument(
        "--student-width", type=width_int, default=None, help="student d_model (the teacher's)"
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens of the timed forward, up to the context (default: it)",
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=None, help="interleaved timed rounds (30; quick: 5)"
    )
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    args = parse_args(parser, argv)
    require_onnx_stack()  # or SKIP with the reason and the install hint
    quick_or_full(
        args,
        group_size=(32, 128),
        calib_samples=(16, 64),
        distil_steps=(40, 300),
        batch_size=(8, 16),
        rounds=(5, 30),
        eval_batches=(4, None),  # full: all
    )
    if args.device != "cpu":
        print(
            f"device {args.device} asked; int8 dynamic quantisation (torch and onnxruntime) runs on the CPU"
        )
        args.device = "cpu"
    source, model, windows = load_for_compression(parser, args, "the combined compression", bits=(4,))
    model.eval()
    cfg = model.config
    try:
        student_cfg = student_config(
            source.data, args.student_layers or max(1, cfg.n_layer // 2), args.student_width or cfg.d_model
        )
    except ValueError as e:
        parser.error(str(e))
    seq = args.seq_len or cfg.context_length
    if seq > cfg.context_length:
        parser.error(f"--seq-len {seq}: the model's context is {cfg.context_length}")
    if round(args.prune * cfg.ffn_dim) >= cfg.ffn_dim:
        parser.error(
            f"--prune {args.prune}: removing {round(args.prune * cfg.ffn_dim)} of {cfg.ffn_dim} neurons "
            "leaves none"
        )
    checks_done(args)

    def folder(key: str) -> str:
        return os.path.join(args.out, key)

    g = args.group_size
    variants: dict[str, Variant] = {"fp32": float_variant(model, folder("fp32"))}
    print("int8 dynamic: torch, then onnxruntime (export, quantize_dynamic)")
    variants["torch_int8"] = torch_int8(model, folder("torch_int8"))
    variants["ort_int8"], onnx_info = ort_int8(model, folder("ort_int8"))
    print(f"4-bit g{g}: GPTQ, AWQ")
    variants["gptq4"] = four_bit(model, "gptq", g, windows, folder("gptq4"))
    variants["awq4"] = four_bit(model, "awq", g, windows, folder("awq4"))
    print(f"structured pruning: {args.prune:.0%} of the feed-forward neurons")
    pruned = prune_ffn(model, windows, args.prune)
    variants["pruned50"] = float_variant(pruned, folder("pruned50"))
    print(
        f"distillation: {args.distil_steps} steps of {args.batch_size} x {source.data.context_length} tokens"
    )
    student = distil(model, student_cfg, source.data, args)
    variants["distilled"] = float_variant(student, folder("distilled"))
    student_g, pruned_g = fitting_group(student, g), fitting_group(pruned, g)
    print(f"GPTQ 4-bit of the student (g{student_g}) and of the pruned model (g{pruned_g})")
    variants["distilled_gptq4"] = four_bit(student, "gptq", student_g, windows, folder("distilled_gptq4"))
    variants["pruned50_gptq4"] = four_bit(pruned, "gptq", pruned_g, windows, folder("pruned50_gptq4"))

    x = source.data.val[:seq][None]  # (1, seq)
    with torch.inference_mode():
        ref = model(x)[0]
        logit_diff = {
            k: (variants[k].model(x)[0] - ref).abs().max().item() for k in ("torch_int8", "ort_int8")
        }

        def forward(m):
            return lambda: m(x)

        print(f"timing: {args.rounds} interleaved rounds of one forward of (1, {seq}) tokens per variant")
        contenders = {k: forward(v.model) for k, v in variants.items()}
        contenders |= {f"{k} plain": forward(v.plain) for k, v in variants.items() if v.plain is not None}
        times = race(contenders, args.rounds)
        kernel_diff = {
            k: (v.model(x)[0] - v.plain(x)[0]).abs().max().item()
            for k, v in variants.items()
            if v.plain is not None
        }

    rows = {}
    for key, v in variants.items():
        exact = v.plain if v.plain is not None else v.model  # quality of the quantised model itself
        ev = evaluate_lm(exact, source.data, batch_size=16, max_batches=args.eval_batches, device="cpu")
        rows[key] = {
            "bytes": v.bytes,
            "size_ratio": v.bytes / variants["fp32"].bytes,
            "ms": statistics.median(times[key]) * 1e3,
            "latency_ratio": paired_ratio(times[key], times["fp32"]),
            "ppl": ev["ppl"],
            "bpb": ev["bpb"],
        }
        if v.plain is not None:
            rows[key]["plain_latency_ratio"] = paired_ratio(times[f"{key} plain"], times["fp32"])

    print(
        f"\n{'variant':27} {'MB':>7} {'x fp32':>7} {'ms':>8} {'x fp32':>7} {'ppl':>9} {'bpb':>7}  stored as"
    )
    for key, r in rows.items():
        print(
            f"{VARIANTS[key]:27} {r['bytes'] / 1e6:7.3f} {r['size_ratio']:7.3f} {r['ms']:8.2f} "
            f"{r['latency_ratio']:7.2f} {r['ppl']:9.3f} {r['bpb']:7.4f}  {variants[key].stored}"
        )
    fp_params, p_params, s_params = (variants[k].params for k in ("fp32", "pruned50", "distilled"))
    print(
        f"\nms: one forward at batch 1 over {seq} tokens, median of {args.rounds} rounds; x fp32: median of "
        f"the per-round ratios. torch threads {torch.get_num_threads()}; onnxruntime: its default threads."
        f"\nparameters: fp32 {fp_params:,}; pruned {p_params:,} ({p_params / fp_params:.2f}x); student "
        f"{s_params:,} ({s_params / fp_params:.2f}x: "
        f"{student_cfg.n_layer} of the teacher's {cfg.n_layer} layers, width {student_cfg.d_model})"
        f"\nmax |logit - fp32 logit| on the timed sequence: torch int8 {logit_diff['torch_int8']:.3f}, "
        f"onnxruntime int8 {logit_diff['ort_int8']:.3f}"
    )
    four = [k for k, v in variants.items() if v.plain is not None]
    print(
        f"4-bit rows: latency on torch's int4 kernel ({variants[four[0]].paths}; common.quant_runtime), "
        "perplexity of the quantised model itself; on the plain dequantise-then-matmul QuantLinear path "
        "the same forwards take "
        + ", ".join(f"{k} {rows[k]['plain_latency_ratio']:.2f}x" for k in four)
        + " fp32's time; max |kernel logit - plain logit| "
        + f"{max(kernel_diff.values()):.3f}"
    )
    for what, group in (("the pruned model", pruned_g), ("the student", student_g)):
        if group != g:
            print(
                f"groups of {g} do not divide every input width of {what}: it was quantised with groups of "
                f"{group} (a little more scale-and-zero overhead per weight)"
            )
    plot_path = plot(os.path.join(args.out, "combined.png"), rows, f"compressing {source.name}")
    print(f"plot: {plot_path}")

    figures = {
        "model": source.name,
        "seq_len": seq,
        "rounds": args.rounds,
        "group_size": g,
        "pruned_group_size": pruned_g,
        "student_group_size": student_g,
        "calib_windows": windows.shape[0],
        "distil_steps": args.distil_steps,
        "student_layers": student_cfg.n_layer,
        "student_width": student_cfg.d_model,
        "fp32_params": fp_params,
        "pruned50_params": p_params,
        "distilled_params": s_params,
        "torch_int8_max_logit_diff": logit_diff["torch_int8"],
        "ort_int8_max_logit_diff": logit_diff["ort_int8"],
        "onnx_exporter": onnx_info["exporter"],
        "ort_fp32_onnx_bytes": onnx_info["fp32_onnx_bytes"],
        "onnxruntime_quantize": onnx_info["onnxruntime_quantize"],
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_settings": "quantize_dynamic defaults; session defaults (threads, ORT_ENABLE_ALL), "
        "no idle spinning",
        "latency": f"one forward, batch 1, {seq} tokens; median of per-round ratios to fp32",
        "int4_paths": variants["gptq4"].paths,
        "int4_kernel_max_logit_diff": max(kernel_diff.values()),
        "plot": plot_path,
    }
    for key, r in rows.items():
        figures.update({f"{key}_{name}": value for name, value in r.items()})
    return figures


if __name__ == "__main__":
    run_script(main)
