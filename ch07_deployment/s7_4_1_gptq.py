"""Section 7.4.1: GPTQ, 4 and 3 bits, against round-to-nearest, on the trained LM.

GPTQ (Frantar et al., 2022) rounds a layer's weight one column at a time and hands each column's
rounding error, weighted by the inverse Hessian ``H = 2·XᵀX/n`` of the layer's calibration inputs, to the
columns not yet rounded, so the layer's output moves as little as it can.  The code is in
``common/quant.py`` (:func:`common.quant.gptq`, :func:`common.quant.gptq_model`): calibration windows come
from the training split, and each layer's inputs come from the layers before it, already quantised.

The script quantises every linear layer of the transformer blocks (embeddings and the output head stay
fp32, as in the paper) with RTN and GPTQ at 4 bits per output channel and with groups of 128 columns,
and at 3 bits with groups, and measures validation perplexity and bits per byte, quantisation time, and
the size of the packed int4 model on disk beside the fp32 one.  The paper's OPT-125M WikiText-2 row is
printed beside ours: the *shape* to compare is GPTQ's increase over fp being a fraction of RTN's.
GPTQ takes each group's range where the reference code takes it (before the updates of the block's
earlier columns; ``common.quant.gptq``'s ``group_range``); with groups below 128 the script also runs
the other choice, the range of the updated weights, and prints both.

    python -m ch07_deployment.s7_4_1_gptq
    python -m ch07_deployment.s7_4_1_gptq --hf-path /path/to/llama   # a local Llama checkpoint
    python -m ch07_deployment.s7_4_1_gptq --quick

Where GPTQModel imports (an optional anchor: ``requirements-anchors.txt`` says how to install it beside
torch's CPU build), it quantises the same model, written as a Hugging Face folder
(``LMSource.hf_folder``), on the same windows with the same settings; its checkpoint is read back
(:mod:`common.quant_checkpoints`) and the script prints its perplexity and the share of its codes equal
to ours.  auto-gptq is only reported: 0.7.1 fails to import with transformers 5.
"""

from __future__ import annotations

import json
import os

import torch

from common.gptqmodel_anchor import code_agreement, library_status, quantize_with_gptqmodel
from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.model_files import path_bytes, save_safetensors
from common.quant import (
    QuantLinear,
    pack_model,
    quantize_model,
    quantized_bytes,
    save_quantized,
)
from common.quant_checkpoints import as_decoder_weights, read_gptq_checkpoint
from common.runner import (
    checks_done,
    group_size_int,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)

# GPTQ paper, Table 3: OPT-125M, WikiText-2 perplexity, 4 bits per channel
PAPER_OPT125M = {"fp16": 27.65, "rtn4": 37.28, "gptq4": 31.12}


def gptqmodel_settings(group_size: int, act_order: bool, damp: float) -> dict:
    """GPTQModel's QuantizeConfig for the same quantiser as ours: 4 bits, asymmetric, ``damp`` of the
    mean diagonal, our act-order choice; its extras off (group-aware reordering, the RTN fallback for
    rarely seen layers, raising the dampening when a Cholesky fails), which ours does not have."""
    return dict(
        bits=4,
        group_size=group_size,
        desc_act=act_order,
        sym=False,
        damp_percent=damp,
        act_group_aware=False,
        fallback=None,
        damp_auto_increment=0.0,
    )


def run_gptqmodel(source, model, windows, settings: dict, out: str, evaluate) -> tuple[dict, dict]:
    """GPTQModel quantises the same model (as a Hugging Face folder) on the same calibration windows
    (:mod:`common.gptqmodel_anchor`); its checkpoint is read back into our weights, so its perplexity is
    measured by the same evaluation.  Returns ``({block linear: QuantizedWeight}, figures)``."""
    import gptqmodel
    from gptqmodel import QuantizeConfig

    hf = source.hf_folder(os.path.join(out, "hf"))
    folder = os.path.join(out, "gptqmodel")
    log_path = os.path.join(out, "gptqmodel.log")
    seconds = quantize_with_gptqmodel(
        hf, QuantizeConfig(**settings), windows, folder, log_path, torch.float32
    )
    weights, _ = read_gptq_checkpoint(folder)
    theirs = as_decoder_weights(weights, model.config.n_layer)
    ppl = evaluate(pack_model(model, theirs))["ppl"]
    return theirs, {
        "gptqmodel_version": gptqmodel.__version__,
        "gptqmodel_ppl": ppl,
        "gptqmodel_seconds": seconds,
    }


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument(
        "--calib-samples", type=positive_int, default=None, help="calibration windows (64; quick: 16)"
    )
    parser.add_argument(
        "--group-size",
        type=group_size_int,
        default=None,
        help="columns per scale/zero group, -1: per row (128; quick: 32)",
    )
    parser.add_argument(
        "--damp", type=positive_float, default=0.01, help="dampening, a fraction of mean(diag H)"
    )
    parser.add_argument("--act-order", action="store_true", help="quantise columns by decreasing H_ii")
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    args = parse_args(parser, argv)
    quick_or_full(
        args, calib_samples=(16, 64), group_size=(32, 128), eval_batches=(4, None)
    )  # full: every batch
    source, model, windows = load_for_compression(parser, args, "GPTQ", bits=(4, 3))
    checks_done(args)

    def evaluate(m) -> dict:
        return evaluate_lm(m, source.data, batch_size=16, max_batches=args.eval_batches)

    fp = evaluate(model)
    rows = [{"name": "fp32", "bits": 32, "group": "-", "ppl": fp["ppl"], "bpb": fp["bpb"], "seconds": 0.0}]
    kept = {}
    for bits, group in ((4, -1), (4, args.group_size), (3, args.group_size)):
        for method in ("rtn", "gptq"):
            options = dict(damp=args.damp, act_order=args.act_order) if method == "gptq" else {}
            fake, qweights, seconds = quantize_model(model, method, bits, group, windows, True, **options)
            r = evaluate(fake)
            rows.append(
                {
                    "name": method.upper(),
                    "bits": bits,
                    "group": group,
                    "ppl": r["ppl"],
                    "bpb": r["bpb"],
                    "seconds": seconds,
                }
            )
            kept[(method, bits, group)] = (fake, qweights)

    print(f"\n{'':6} {'bits':>4} {'group':>6} {'ppl':>9} {'+ppl':>8} {'bpb':>7} {'quant s':>8}")
    for r in rows:
        print(
            f"{r['name']:6} {r['bits']:>4} {r['group']:>6} {r['ppl']:9.3f} {r['ppl'] - fp['ppl']:+8.3f} "
            f"{r['bpb']:7.4f} {r['seconds']:8.1f}"
        )
    p = PAPER_OPT125M
    print(
        f"\nthe paper's OPT-125M (WikiText-2, 4 bits per channel): fp16 {p['fp16']}, RTN {p['rtn4']} "
        f"(+{p['rtn4'] - p['fp16']:.2f}), GPTQ {p['gptq4']} (+{p['gptq4'] - p['fp16']:.2f}): GPTQ keeps "
        f"{(p['gptq4'] - p['fp16']) / (p['rtn4'] - p['fp16']):.2f} of RTN's increase"
    )

    def increase(method, bits, group):
        row = next(
            r for r in rows if r["name"] == method.upper() and r["bits"] == bits and r["group"] == group
        )
        return row["ppl"] - fp["ppl"]

    g = args.group_size
    ratio_g = increase("gptq", 4, g) / max(increase("rtn", 4, g), 1e-9)
    ratio_c = increase("gptq", 4, -1) / max(increase("rtn", 4, -1), 1e-9)
    print(f"ours: GPTQ keeps {ratio_c:.2f} of RTN's increase per channel, {ratio_g:.2f} with groups of {g}")
    updated = {}
    if g != -1 and 128 % g == 0 and g < 128:  # groups that start inside GPTQ's 128-column blocks
        options = dict(damp=args.damp, act_order=args.act_order, group_range="updated")
        for bits in (4, 3):
            fake_u, _, _ = quantize_model(model, "gptq", bits, g, windows, True, **options)
            updated[bits] = evaluate(fake_u)["ppl"]
        print(
            f"group ranges: the reference code (used above) takes a group's range before the updates of the "
            f"block's earlier columns; from the updated weights instead, GPTQ g{g} gives 4 bits "
            f"{updated[4]:.3f} ({updated[4] - fp['ppl']:+.3f}), 3 bits {updated[3]:.3f} "
            f"({updated[3] - fp['ppl']:+.3f}) against {increase('gptq', 4, g):+.3f} and "
            f"{increase('gptq', 3, g):+.3f}"
        )

    fake, qweights = kept[("gptq", 4, g)]
    packed = pack_model(fake, qweights)
    fp_bytes = save_safetensors(model, os.path.join(args.out, "fp32"))
    q_bytes = path_bytes(
        save_quantized(
            packed,
            os.path.join(args.out, f"gptq-int4-g{g}"),
            {"method": "gptq", "bits": 4, "group_size": g, "damp": args.damp, "act_order": args.act_order},
        )
    )
    block_fp = sum(4 * qw.codes.numel() for qw in qweights.values())  # those linears in fp32
    block_q = sum(quantized_bytes(m) for m in packed.modules() if isinstance(m, QuantLinear))
    print(
        f"on disk: fp32 {fp_bytes / 1e6:.2f} MB, GPTQ int4 g{g} {q_bytes / 1e6:.2f} MB "
        f"({q_bytes / fp_bytes:.2f}x; "
        f"the block linears {block_q / block_fp:.2f}x, embeddings and head stay fp32)"
    )
    libs = library_status(os.path.join(args.out, "gptqmodel.log"))
    print(f"auto_gptq: {libs['auto_gptq']}")
    anchor = {}
    if libs["gptqmodel"] == "imports":
        settings = gptqmodel_settings(g, args.act_order, args.damp)
        theirs, anchor = run_gptqmodel(source, model, windows, settings, args.out, evaluate)
        equal, first = code_agreement(qweights, theirs)
        anchor |= {"gptqmodel_codes_equal": equal, "gptqmodel_block0_codes_equal": first}
        anchor["gptqmodel_settings"] = json.dumps(settings)
        ours_ppl = increase("gptq", 4, g) + fp["ppl"]
        print(
            f"GPTQModel {anchor['gptqmodel_version']} on the same model and windows "
            f"({anchor['gptqmodel_settings']}): 4 bits g{g} perplexity {anchor['gptqmodel_ppl']:.3f} (ours "
            f"{ours_ppl:.3f}); its codes equal ours on {equal:.1%} of the weights ({first:.1%} in the first "
            "block, whose inputs both runs share exactly; later blocks see the earlier ones as each run "
            "quantised them)"
        )
    else:
        print(f"gptqmodel: {libs['gptqmodel']}; only this repository's GPTQ ran")

    figures = {"model": source.name, "calib_windows": windows.shape[0], "calib_seq_len": windows.shape[1]}
    for r in rows:
        key = (
            "fp32"
            if r["name"] == "fp32"
            else f"{r['name'].lower()}{r['bits']}_g{r['group']}".replace("-1", "ch")
        )
        figures[f"{key}_ppl"] = r["ppl"]
        figures[f"{key}_bpb"] = r["bpb"]
        if r["name"] != "fp32":
            figures[f"{key}_seconds"] = r["seconds"]
    figures.update(
        gptq_over_rtn_increase_g=ratio_g,
        gptq_over_rtn_increase_ch=ratio_c,
        paper_gptq_over_rtn_increase=(p["gptq4"] - p["fp16"]) / (p["rtn4"] - p["fp16"]),
        fp32_file_bytes=fp_bytes,
        int4_file_bytes=q_bytes,
        int4_over_fp32_file=q_bytes / fp_bytes,
        block_linears_int4_over_fp32=block_q / block_fp,
        **{f"{k}_status": v for k, v in libs.items()},
        **{f"gptq{b}_g{g}_updated_ranges_ppl": v for b, v in updated.items()},
        **anchor,
    )
    return figures


if __name__ == "__main__":
    run_script(main)
