"""Section 7.3.3: edge deployment with ONNX Runtime: export, dynamic int8, size, latency, perplexity.

The trained LM is exported to ONNX (:func:`common.onnx_export.export_decoder`: dynamic batch and
sequence axes, checked by ``onnx.checker``), run with onnxruntime (:class:`common.onnx_export.OrtLM`,
its default graph optimisations), and quantised with ``onnxruntime.quantization.quantize_dynamic``
(int8 weights; activations quantised on the fly per call: the library's default settings).  For
PyTorch eager, ORT fp32 and ORT int8 the script measures the file size, the latency of one forward at
batch 1 over 1, 16 and ``--seq-len`` tokens (the three interleaved round by round, medians of per-round
ratios), the validation perplexity and bits per byte, and how far the ORT logits lie from PyTorch's.
It also measures where ORT's advantage ends: the share of eager's time spent in matrix products, and
ORT's own GEMM kernel time (its profiler), below which no runtime brings a forward at equal GEMM speed.

    python -m ch07_deployment.s7_3_3_edge_deployment
    python -m ch07_deployment.s7_3_3_edge_deployment --quick
"""

from __future__ import annotations

import os
import statistics

import torch

from common.env import require_onnx_stack
from common.lm_source import add_source_args, evaluate_lm, load_decoder
from common.model_files import onnx_bytes, save_safetensors
from common.onnx_export import ORT_GEMM_OPS, OrtDecoder, OrtLM, export_decoder, quantize_dynamic_int8
from common.runner import checks_done, parse_args, positive_int, quick_or_full, run_script, script_parser
from common.timing import gemm_share, paired_ratio, race


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="tokens of the timed forward, up to the model's context (default: it)",
    )
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed rounds (30; quick: 5)")
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    args = parse_args(parser, argv)
    require_onnx_stack()  # or SKIP with the reason and the install hint
    quick_or_full(args, rounds=(5, 30), eval_batches=(4, None))  # full: every batch
    if args.device != "cpu":
        print(f"device {args.device} asked; the edge path runs on the CPU")
        args.device = "cpu"
    source, model = load_decoder(parser, args, "ONNX export")
    model = model.cpu().eval()
    seq = args.seq_len or model.config.context_length
    if seq > model.config.context_length:
        parser.error(f"--seq-len {seq}: the model's context is {model.config.context_length}")
    checks_done(args)
    os.makedirs(args.out, exist_ok=True)
    fp_path, q_path = os.path.join(args.out, "lm.onnx"), os.path.join(args.out, "lm.int8.onnx")
    info = export_decoder(model, fp_path)
    settings = quantize_dynamic_int8(fp_path, q_path)
    fp_sess = OrtLM(fp_path, providers=["CPUExecutionProvider"], spinning=False)
    q_sess = OrtLM(q_path, providers=["CPUExecutionProvider"], spinning=False)

    x = source.data.val[:seq][None]  # (1, seq)
    with torch.no_grad():
        ref = model(x)[0]
    fp_diff = (torch.from_numpy(fp_sess(x)) - ref).abs().max().item()
    q_diff = (torch.from_numpy(q_sess(x)) - ref).abs().max().item()

    # batch 1 at a few lengths: the three interleaved round by round, ratios taken within a round
    latency = {}
    for n in sorted({1, min(16, seq), seq}):
        xn = x[:, :n]

        def eager(xn=xn):
            with torch.no_grad():
                model(xn)

        times = race(
            {"pytorch": eager, "ort_fp32": lambda xn=xn: fp_sess(xn), "ort_int8": lambda xn=xn: q_sess(xn)},
            args.rounds,
        )
        latency[n] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        latency[n]["fp32_ratio"] = paired_ratio(times["ort_fp32"], times["pytorch"])
        latency[n]["int8_ratio"] = paired_ratio(times["ort_int8"], times["pytorch"])
    med, ratio, ratio_q = latency[seq], latency[seq]["fp32_ratio"], latency[seq]["int8_ratio"]
    with torch.no_grad():
        share = gemm_share(lambda: model(x))
    fp_gemm = sum(ms for op, ms in fp_sess.kernel_ms(x).items() if op in ORT_GEMM_OPS)

    pt = evaluate_lm(model, source.data, batch_size=16, max_batches=args.eval_batches)
    evals = {
        "pytorch": pt,
        "ort_fp32": evaluate_lm(OrtDecoder(fp_sess), source.data, 16, args.eval_batches, device="cpu"),
        "ort_int8": evaluate_lm(OrtDecoder(q_sess), source.data, 16, args.eval_batches, device="cpu"),
    }
    pytorch_bytes = save_safetensors(model, os.path.join(args.out, "pytorch"))  # the eager model's file
    sizes = {"pytorch": pytorch_bytes, "ort_fp32": onnx_bytes(fp_path)}
    sizes["ort_int8"] = onnx_bytes(q_path)
    print(f"{source.describe()}; exported by the {info['exporter']} exporter, opset {info['opset']}")
    print(f"\n{'':9} {'MB':>7} {'ms (b=1, ' + str(seq) + ' tok)':>18} {'ppl':>9} {'bpb':>7}")
    for k in ("pytorch", "ort_fp32", "ort_int8"):
        print(f"{k:9} {sizes[k] / 1e6:7.2f} {med[k]:18.2f} {evals[k]['ppl']:9.3f} {evals[k]['bpb']:7.4f}")
    print(
        f"\nbatch-1 latency, ms (ratio to eager PyTorch; medians of per-round ratios, {args.rounds} rounds):"
    )
    for n, row in latency.items():
        print(
            f"  {n:4d} tokens: pytorch {row['pytorch']:7.2f}   ort fp32 {row['ort_fp32']:7.2f} "
            f"({row['fp32_ratio']:.2f}x)   ort int8 {row['ort_int8']:7.2f} ({row['int8_ratio']:.2f}x)"
        )
    print(
        f"  at {seq} tokens eager spends {share:.0%} of its time in matrix products; onnxruntime's fp32 "
        f"MatMul kernels alone take {fp_gemm / med['pytorch']:.2f}x eager's forward: the fp32 ratio cannot "
        f"fall below that. ORT saves the overhead around the GEMMs, most of a short input's time."
    )
    print(
        f"\nint8 file {sizes['ort_int8'] / sizes['ort_fp32']:.2f}x the fp32 file (int8 weights with a scale "
        f"per tensor; the graph's own constants stay); max |logit difference| from PyTorch: fp32 "
        f"{fp_diff:.2e}, int8 {q_diff:.2e}"
    )
    return {
        "exporter": info["exporter"],
        "seq_len": seq,
        "pytorch_safetensors_bytes": sizes["pytorch"],
        "fp32_onnx_bytes": sizes["ort_fp32"],
        "int8_onnx_bytes": sizes["ort_int8"],
        "int8_over_fp32_file": sizes["ort_int8"] / sizes["ort_fp32"],
        "pytorch_ms": med["pytorch"],
        "ort_fp32_ms": med["ort_fp32"],
        "ort_int8_ms": med["ort_int8"],
        "ort_fp32_over_eager_latency": ratio,
        "ort_int8_over_eager_latency": ratio_q,
        **{f"ort_fp32_over_eager_s{n}": row["fp32_ratio"] for n, row in latency.items() if n != seq},
        **{f"ort_int8_over_eager_s{n}": row["int8_ratio"] for n, row in latency.items() if n != seq},
        "eager_gemm_share": share,
        "ort_fp32_gemm_floor": fp_gemm / med["pytorch"],
        "pytorch_ppl": evals["pytorch"]["ppl"],
        "ort_fp32_ppl": evals["ort_fp32"]["ppl"],
        "ort_int8_ppl": evals["ort_int8"]["ppl"],
        "ort_int8_bpb": evals["ort_int8"]["bpb"],
        "ort_fp32_max_logit_diff": fp_diff,
        "ort_int8_max_logit_diff": q_diff,
        "onnxruntime_settings": f"default graph optimisations; {settings['onnxruntime_quantize']}",
    }


if __name__ == "__main__":
    run_script(main)
