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

Where GPTQModel imports (an optional anchor: ``requirements-anchors.txt``), its AWQ quantises the same
model, written as a Hugging Face folder (``LMSource.hf_folder``), on the same windows at 4 bits with the
same groups and zero points; GPTQModel's AWQ runs only in fp16/bf16, so it quantises the model in bf16.
Its ``gemm`` checkpoint is read back (:func:`common.quant_checkpoints.read_awq_checkpoint`: the packed
linears and the norms it rescaled) and the script prints its perplexity, measured in fp32 by the same
evaluation, and the share of its codes equal to ours.  Its scale search is AutoAWQ's (``s = mean|x|^α /
mean|ŵ|^(1-α)``, with the weights' group-normalised magnitude), ours the paper's (``s = mean|x|^α``), so
the codes are not expected to be equal; the perplexities are the comparison.  autoawq (deprecated) is
only reported.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from common.gptqmodel_anchor import code_agreement, library_status, quantize_with_gptqmodel
from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.quant import pack_model, quantize_model
from common.quant_checkpoints import as_decoder_norms, as_decoder_weights, read_awq_checkpoint
from common.runner import (
    checks_done,
    group_size_int,
    int_between,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)

# AWQ paper, Table 4: Llama-2-7B, WikiText-2 perplexity, INT4 g128
PAPER_LLAMA2_7B = {"fp16": 5.47, "rtn": 5.73, "gptq": 5.69, "awq": 5.60}


def gptqmodel_awq_settings(group_size: int) -> dict:
    """GPTQModel's AWQConfig for the same quantiser as ours: 4 bits, groups of ``group_size``, zero points
    (asymmetric, the paper's choice); everything else as it ships."""
    return dict(bits=4, group_size=group_size, sym=False)


def run_gptqmodel_awq(source, model, windows, settings: dict, out: str, evaluate) -> tuple[dict, dict]:
    """GPTQModel's AWQ of the same model on the same windows (:mod:`common.gptqmodel_anchor`), in bf16;
    its checkpoint's linears and rescaled norms go into a copy of ``model``, evaluated in fp32.
    Returns ``({block linear: QuantizedWeight}, figures)``."""
    import gptqmodel
    from gptqmodel import AWQConfig

    hf = source.hf_folder(os.path.join(out, "hf"))
    folder = os.path.join(out, "gptqmodel-awq")
    log_path = os.path.join(out, "gptqmodel.log")
    seconds = quantize_with_gptqmodel(hf, AWQConfig(**settings), windows, folder, log_path, torch.bfloat16)
    weights, others, _ = read_awq_checkpoint(folder)
    n_layer = model.config.n_layer
    theirs = as_decoder_weights(weights, n_layer)
    rescaled = copy.deepcopy(model)
    rescaled.load_state_dict(
        {k: v.float() for k, v in as_decoder_norms(others, n_layer).items()}, strict=False
    )
    ppl = evaluate(pack_model(rescaled, theirs))["ppl"]
    return theirs, {
        "gptqmodel_version": gptqmodel.__version__,
        "gptqmodel_awq4_ppl": ppl,
        "gptqmodel_awq4_seconds": seconds,
        "gptqmodel_awq_dtype": "bf16",
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
        "--grid", type=int_between(2, 200), default=20, help="points of the α grid and the clipping grid"
    )
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    args = parse_args(parser, argv)
    quick_or_full(
        args, calib_samples=(16, 64), group_size=(32, 128), eval_batches=(4, None)
    )  # full: every batch
    source, model, windows = load_for_compression(parser, args, "AWQ", bits=(4, 3))
    checks_done(args)

    def evaluate(m) -> dict:
        return evaluate_lm(m, source.data, batch_size=16, max_batches=args.eval_batches)

    fp = evaluate(model)
    g = args.group_size
    results, awq4 = {}, {}
    for bits in (4, 3):
        for method in ("rtn", "gptq", "awq"):
            options = {"n_grid": args.grid} if method == "awq" else {}
            fake, qweights, seconds = quantize_model(model, method, bits, g, windows, True, **options)
            results[(method, bits)] = {**evaluate(fake), "seconds": seconds}
            if (method, bits) == ("awq", 4):
                awq4 = qweights

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
    libs = library_status(os.path.join(args.out, "gptqmodel.log"), ("awq", "gptqmodel"))
    print(f"autoawq: {libs['awq']}")
    anchor = {}
    if libs["gptqmodel"] == "imports":
        settings = gptqmodel_awq_settings(g)
        theirs, anchor = run_gptqmodel_awq(source, model, windows, settings, args.out, evaluate)
        equal, first = code_agreement(awq4, theirs)
        anchor |= {"gptqmodel_awq4_codes_equal": equal, "gptqmodel_awq4_block0_codes_equal": first}
        anchor["gptqmodel_awq_settings"] = json.dumps(settings)
        ours, theirs_ppl = results[("awq", 4)]["ppl"], anchor["gptqmodel_awq4_ppl"]
        print(
            f"GPTQModel {anchor['gptqmodel_version']}'s AWQ on the same model and windows "
            f"({anchor['gptqmodel_awq_settings']}, quantised in bf16, evaluated in fp32): 4 bits g{g} "
            f"perplexity {theirs_ppl:.3f} ({theirs_ppl - fp['ppl']:+.3f}; "
            f"ours {ours:.3f}, {ours - fp['ppl']:+.3f}); its codes equal ours on {equal:.1%} of the weights "
            f"({first:.1%} in the first block; the scale searches differ, see the docstring)"
        )
    else:
        print(f"gptqmodel: {libs['gptqmodel']}; only this repository's AWQ ran")

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
    figures["autoawq_status"] = libs["awq"]
    figures["gptqmodel_status"] = libs["gptqmodel"]
    return figures | anchor


if __name__ == "__main__":
    run_script(main)
