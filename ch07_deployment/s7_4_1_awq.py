"""Section 7.4.1: AWQ (activation-aware weight quantisation) beside RTN and GPTQ on the trained LM.

AWQ (Lin et al., 2023) keeps round-to-nearest but protects the weights that matter: the input channels
that see large activations.  It multiplies those weight columns by ``s`` before rounding and divides the
op before them (an RMSNorm's weight, the value rows feeding the output projection, the up rows feeding
the down projection) by ``s``, which changes nothing in full precision.  ``s = mean|x|^α`` with α searched
on a grid per layer group by the group's output error; then a clipping range per weight group is
searched.  The code is in ``common/quant.py`` (:func:`common.quant.awq_model`).

The script quantises the block linears at 4 and 3 bits with groups of 128 columns by RTN, GPTQ and AWQ on
the same calibration windows, and prints validation perplexity, bits per byte and quantisation time
beside the paper's Llama-2-7B g128 row.

    python -m ch07_deployment.s7_4_1_awq
    python -m ch07_deployment.s7_4_1_awq --quick

autoawq runs on the same model only when it imports; the script says when it does not.
"""

from __future__ import annotations

from common.env import import_status
from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.quant import quantize_model
from common.runner import parse_args, run_script, script_parser

# AWQ paper, Table 4: Llama-2-7B, WikiText-2 perplexity, INT4 g128
PAPER_LLAMA2_7B = {"fp16": 5.47, "rtn": 5.73, "gptq": 5.69, "awq": 5.60}


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows (quick: 16)")
    parser.add_argument(
        "--group-size", type=int, default=128, help="columns per scale/zero group (quick: 32)"
    )
    parser.add_argument("--grid", type=int, default=20, help="points of the α grid and the clipping grid")
    parser.add_argument("--eval-batches", type=int, default=None, help="validation batches of 16 (all)")
    args = parse_args(parser, argv)
    if args.quick:
        args.calib_samples, args.group_size = min(args.calib_samples, 16), min(args.group_size, 32)
        args.eval_batches = args.eval_batches or 4
    if args.grid < 2:
        parser.error(f"--grid must be at least 2, got {args.grid}")
    source, model, windows = load_for_compression(parser, args, "AWQ", bits=(4, 3))

    def evaluate(m) -> dict:
        return evaluate_lm(m, source.data, batch_size=16, max_batches=args.eval_batches)

    fp = evaluate(model)
    g = args.group_size
    results = {}
    for bits in (4, 3):
        for method in ("rtn", "gptq", "awq"):
            options = {"n_grid": args.grid} if method == "awq" else {}
            fake, _, seconds = quantize_model(model, method, bits, g, windows, True, **options)
            results[(method, bits)] = {**evaluate(fake), "seconds": seconds}

    print(f"\n{'':6} {'bits':>4} {'ppl':>9} {'+ppl':>8} {'bpb':>7} {'quant s':>8}")
    print(f"{'fp32':6} {32:>4} {fp['ppl']:9.3f} {0:+8.3f} {fp['bpb']:7.4f}")
    for (method, bits), r in results.items():
        print(
            f"{method.upper():6} {bits:>4} {r['ppl']:9.3f} {r['ppl'] - fp['ppl']:+8.3f} {r['bpb']:7.4f} "
            f"{r['seconds']:8.1f}"
        )
    p = PAPER_LLAMA2_7B
    print(
        f"\nthe paper's Llama-2-7B (WikiText-2, INT4 g128): fp16 {p['fp16']}, RTN {p['rtn']}, "
        f"GPTQ {p['gptq']}, AWQ {p['awq']}"
    )
    status = import_status("awq")
    print(f"autoawq: {status}" + ("" if status == "imports" else "; only this repository's AWQ ran"))

    figures = {
        "model": source.name,
        "group_size": g,
        "calib_windows": windows.shape[0],
        "fp32_ppl": fp["ppl"],
    }
    figures["fp32_bpb"] = fp["bpb"]
    for (method, bits), r in results.items():
        figures[f"{method}{bits}_ppl"] = r["ppl"]
        figures[f"{method}{bits}_bpb"] = r["bpb"]
        figures[f"{method}{bits}_seconds"] = r["seconds"]
    for bits in (4, 3):
        figures[f"awq{bits}_below_rtn"] = results[("awq", bits)]["ppl"] < results[("rtn", bits)]["ppl"]
        figures[f"gptq{bits}_below_rtn"] = results[("gptq", bits)]["ppl"] < results[("rtn", bits)]["ppl"]
    figures["autoawq_status"] = status
    return figures


if __name__ == "__main__":
    run_script(main)
