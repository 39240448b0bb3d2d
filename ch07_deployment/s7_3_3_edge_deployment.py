"""Section 7.3.3: edge deployment with ONNX Runtime: export, dynamic int8, size, latency, perplexity.

The trained LM is exported to ONNX (:func:`common.onnx_export.export_decoder`: dynamic batch and
sequence axes, checked by ``onnx.checker``), run with onnxruntime (:class:`common.onnx_export.OrtLM`,
its default graph optimisations), and quantised with ``onnxruntime.quantization.quantize_dynamic``
(int8 weights; activations quantised on the fly per call: the library's default settings).  For
PyTorch eager, ORT fp32 and ORT int8 the script measures the file size, the latency of one forward at
batch 1 (the three interleaved, median of the rounds), the validation perplexity and bits per byte,
and how far the ORT logits lie from PyTorch's.

    python -m ch07_deployment.s7_3_3_edge_deployment
    python -m ch07_deployment.s7_3_3_edge_deployment --quick
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from common.lm_source import add_source_args, evaluate_lm, load_source
from common.model_files import onnx_bytes
from common.onnx_export import OrtDecoder, OrtLM, export_decoder
from common.runner import parse_args, run_script, script_parser


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens of the timed forward (context)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (quick: 5)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches of 16 (all)")
    args = parse_args(parser, argv)
    if args.quick:
        args.rounds, args.eval_batches = min(args.rounds, 5), args.eval_batches or 4
    if args.device != "cpu":
        print(f"device {args.device} asked; the edge path runs on the CPU")
        args.device = "cpu"
    source = load_source(parser, args)
    try:
        model = source.decoder("ONNX export").cpu().eval()
    except ValueError as e:
        parser.error(str(e))
    seq = args.seq_len or model.config.context_length
    if not 1 <= seq <= model.config.context_length:
        parser.error(f"--seq-len must be in [1, {model.config.context_length}], got {seq}")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    os.makedirs(args.out, exist_ok=True)
    fp_path, q_path = os.path.join(args.out, "lm.onnx"), os.path.join(args.out, "lm.int8.onnx")
    info = export_decoder(model, fp_path)
    quantize_dynamic(fp_path, q_path, weight_type=QuantType.QInt8)
    fp_sess = OrtLM(fp_path, providers=["CPUExecutionProvider"], spinning=False)
    q_sess = OrtLM(q_path, providers=["CPUExecutionProvider"], spinning=False)

    x = source.data.val[:seq][None]  # (1, seq)
    with torch.no_grad():
        ref = model(x)[0]
    fp_diff = (torch.from_numpy(fp_sess(x)) - ref).abs().max().item()
    q_diff = (torch.from_numpy(q_sess(x)) - ref).abs().max().item()

    runners = {
        "pytorch": lambda: model(x),
        "ort_fp32": lambda: fp_sess(x),
        "ort_int8": lambda: q_sess(x),
    }
    times = {k: [] for k in runners}
    with torch.no_grad():
        for fn in runners.values():
            fn()  # warm up
        for _ in range(args.rounds):
            for k, fn in runners.items():  # interleaved: drifts of the machine hit all three alike
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["ort_fp32"], times["pytorch"]))
    ratio_q = statistics.median(a / b for a, b in zip(times["ort_int8"], times["pytorch"]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    pt = evaluate_lm(model, source.data, batch_size=16, max_batches=args.eval_batches)
    evals = {
        "pytorch": pt,
        "ort_fp32": evaluate_lm(OrtDecoder(fp_sess), source.data, 16, args.eval_batches, device="cpu"),
        "ort_int8": evaluate_lm(OrtDecoder(q_sess), source.data, 16, args.eval_batches, device="cpu"),
    }
    sizes = {"pytorch": sum(p.numel() * 4 for p in model.parameters()), "ort_fp32": onnx_bytes(fp_path)}
    sizes["ort_int8"] = onnx_bytes(q_path)
    print(f"{source.describe()}; exported by the {info['exporter']} exporter, opset {info['opset']}")
    print(f"\n{'':9} {'MB':>7} {'ms (b=1, ' + str(seq) + ' tok)':>18} {'ppl':>9} {'bpb':>7}")
    for k in runners:
        print(f"{k:9} {sizes[k] / 1e6:7.2f} {med[k]:18.2f} {evals[k]['ppl']:9.3f} {evals[k]['bpb']:7.4f}")
    print(
        f"\nORT fp32 / eager latency {ratio:.2f}x, ORT int8 / eager {ratio_q:.2f}x (medians of per-round "
        f"ratios); int8 file {sizes['ort_int8'] / sizes['ort_fp32']:.2f}x the fp32 file; max |logit "
        f"difference| from PyTorch: fp32 {fp_diff:.2e}, int8 {q_diff:.2e}"
    )
    return {
        "exporter": info["exporter"],
        "seq_len": seq,
        "fp32_onnx_bytes": sizes["ort_fp32"],
        "int8_onnx_bytes": sizes["ort_int8"],
        "int8_over_fp32_file": sizes["ort_int8"] / sizes["ort_fp32"],
        "pytorch_ms": med["pytorch"],
        "ort_fp32_ms": med["ort_fp32"],
        "ort_int8_ms": med["ort_int8"],
        "ort_fp32_over_eager_latency": ratio,
        "ort_int8_over_eager_latency": ratio_q,
        "pytorch_ppl": evals["pytorch"]["ppl"],
        "ort_fp32_ppl": evals["ort_fp32"]["ppl"],
        "ort_int8_ppl": evals["ort_int8"]["ppl"],
        "ort_int8_bpb": evals["ort_int8"]["bpb"],
        "ort_fp32_max_logit_diff": fp_diff,
        "ort_int8_max_logit_diff": q_diff,
        "onnxruntime_settings": "default graph optimisations; quantize_dynamic(weight_type=QInt8) defaults",
    }


if __name__ == "__main__":
    run_script(main)
