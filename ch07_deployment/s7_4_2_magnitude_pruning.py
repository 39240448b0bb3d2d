"""Section 7.4.2 ("Decrease in range"): magnitude pruning, per layer and global, 2:4 semi-structured
sparsity, and Wanda's activation-aware score, against validation perplexity on the trained LM.

Unstructured pruning sets the least important weights of every block linear to zero (embeddings and the
output head stay dense).  The score is either the plain magnitude ``|W_ij|`` or Wanda's ``|W_ij|·‖X_j‖₂``
(Sun et al., 2023), the magnitude times the L2 norm of input feature ``j`` over calibration tokens of the
training split, so a small weight on a loud input survives.  The code is in ``common/prune.py``:

- global magnitude (:func:`~common.prune.global_magnitude_masks`): one ranking over every matrix, so
  some layers lose more than others;
- per-layer magnitude (:func:`~common.prune.layer_magnitude_masks`): every matrix loses the same fraction;
- Wanda (:func:`~common.prune.wanda_prune`): each output row loses the same fraction, block by block,
  each block calibrated on the outputs of the blocks before it, already pruned;
- 2:4 (:func:`~common.prune.n_m_mask`): the 2 best of every 4 consecutive inputs, by either score: 50%
  sparsity in the pattern sparse tensor cores run.

The script sweeps sparsity from 0 to 90% and plots perplexity against it (``pruning.png`` in ``--out``),
with the two 2:4 points at 50%.  Pruning works on copies: the loaded model is never changed.

    python -m ch07_deployment.s7_4_2_magnitude_pruning
    python -m ch07_deployment.s7_4_2_magnitude_pruning --hf-path /path/to/llama   # a local Llama
    python -m ch07_deployment.s7_4_2_magnitude_pruning --quick

What to look for: how far sparsity can go before perplexity climbs, whether Wanda stays below plain
magnitude at high sparsity, and what the 2:4 pattern costs against unstructured pruning at the same 50%.
The Wanda paper's LLaMA-7B row is printed beside ours (50%: dense 5.68, magnitude 17.29, Wanda 7.26;
2:4: magnitude 42.13, Wanda 11.53); a model this small has far less redundancy, so compare the shape.
"""

from __future__ import annotations

import copy
import os

from common.lm_source import add_source_args, evaluate_lm, load_for_compression
from common.plotting import pyplot, save_figure
from common.prune import (
    apply_masks,
    global_magnitude_masks,
    layer_magnitude_masks,
    linear_weights,
    magnitude_n_m_masks,
    sparsity_of,
    wanda_prune,
)
from common.runner import (
    checks_done,
    fraction,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)

# Wanda paper, Table 3: LLaMA-7B, WikiText-2 perplexity at 50% unstructured sparsity, and 2:4
PAPER_LLAMA7B = {"dense": 5.68, "magnitude": 17.29, "wanda": 7.26, "magnitude_2:4": 42.13, "wanda_2:4": 11.53}
METHODS = ("global magnitude", "layer magnitude", "wanda")


def masked_copy(model, masks: dict):
    """A copy of ``model`` with ``masks`` applied (the model itself keeps its weights)."""
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    return pruned


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_source_args(parser)
    parser.add_argument(
        "--sparsities",
        type=fraction,
        nargs="+",
        default=None,
        help="fractions of each block linear's weights to prune "
        "(default 0 0.3 0.5 0.7 0.8 0.9; quick: 0 0.5 0.9)",
    )
    parser.add_argument(
        "--calib-samples", type=positive_int, default=None, help="calibration windows (default 32, quick: 8)"
    )
    parser.add_argument(
        "--eval-batches", type=positive_int, default=None, help="validation batches of 16 (all)"
    )
    args = parse_args(parser, argv)
    quick_or_full(
        args,
        sparsities=([0.0, 0.5, 0.9], [0.0, 0.3, 0.5, 0.7, 0.8, 0.9]),
        calib_samples=(8, 32),
        eval_batches=(4, None),  # full: every batch
    )
    sparsities = sorted(set(args.sparsities))
    source, model, windows = load_for_compression(parser, args, "Wanda pruning")
    checks_done(args)
    weights = linear_weights(model)
    four = [n for n, w in weights.items() if w.shape[1] % 4]
    print(f"pruned: {len(weights)} block linears, {sum(w.numel() for w in weights.values()):,} weights")

    def evaluate(m) -> float:
        return evaluate_lm(m, source.data, batch_size=16, max_batches=args.eval_batches)["ppl"]

    dense = evaluate(model)
    ppl = {m: {} for m in METHODS}
    reached = {m: {} for m in METHODS}
    for s in sparsities:
        for method in METHODS:
            if s == 0.0:
                ppl[method][s], reached[method][s] = dense, 0.0
                continue
            if method == "wanda":
                pruned, _ = wanda_prune(model, windows, s)
            else:
                pick = global_magnitude_masks if method == "global magnitude" else layer_magnitude_masks
                pruned = masked_copy(model, pick(weights, s))
            ppl[method][s] = evaluate(pruned)
            reached[method][s] = sparsity_of(linear_weights(pruned).values())
    two_four = {}
    if four:
        print(f"2:4 skipped: input widths not divisible by 4 ({', '.join(four)})")
    else:
        two_four["magnitude"] = evaluate(masked_copy(model, magnitude_n_m_masks(weights)))
        two_four["wanda"] = evaluate(wanda_prune(model, windows, n_m=(2, 4))[0])

    print(f"\nvalidation perplexity (dense {dense:.3f})")
    print(f"{'sparsity':>8} " + " ".join(f"{m:>17}" for m in METHODS))
    for s in sparsities:
        print(f"{s:8.0%} " + " ".join(f"{ppl[m][s]:17.3f}" for m in METHODS))
    for score, value in two_four.items():
        print(f"{'2:4':>8} {score:>17} {value:17.3f}")
    p = PAPER_LLAMA7B
    print(
        f"\nthe Wanda paper's LLaMA-7B (WikiText-2): dense {p['dense']}, 50% magnitude {p['magnitude']}, "
        f"50% Wanda {p['wanda']}, 2:4 magnitude {p['magnitude_2:4']}, 2:4 Wanda {p['wanda_2:4']}"
    )
    if 0.5 in sparsities:
        print(
            f"ours at 50%: layer magnitude {ppl['layer magnitude'][0.5]:.3f}, Wanda {ppl['wanda'][0.5]:.3f}"
            + (
                f"; 2:4 magnitude {two_four['magnitude']:.3f}, Wanda {two_four['wanda']:.3f}"
                if two_four
                else ""
            )
        )

    plt = pyplot()
    from matplotlib.ticker import ScalarFormatter  # after pyplot() has chosen the file-only backend

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in zip(METHODS, "osd"):
        ax.plot(
            [100 * s for s in sparsities], [ppl[method][s] for s in sparsities], marker=marker, label=method
        )
    for (score, value), marker, color in zip(two_four.items(), "^v", ("C3", "C2")):
        ax.scatter([50], [value], marker=marker, s=60, color=color, zorder=3, label=f"2:4 {score}")
    ax.axhline(dense, color="grey", lw=0.8, ls="--", label="dense")
    ax.set(xlabel="sparsity of the block linears (%)", ylabel="validation perplexity", yscale="log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(f"pruning {source.name}")
    ax.legend(fontsize=8)
    plot = save_figure(fig, os.path.join(args.out, "pruning.png"))
    print(f"plot: {plot}")

    figures = {"model": source.name, "calib_windows": windows.shape[0], "dense_ppl": dense, "plot": plot}
    for method in METHODS:
        key = method.replace(" ", "_")
        for s in sparsities:
            figures[f"{key}_{round(100 * s)}_ppl"] = ppl[method][s]
            figures[f"{key}_{round(100 * s)}_sparsity"] = reached[method][s]
    for score, value in two_four.items():
        figures[f"{score}_2_4_ppl"] = value
    return figures


if __name__ == "__main__":
    run_script(main)
