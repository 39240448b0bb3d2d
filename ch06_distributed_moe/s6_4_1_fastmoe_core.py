"""Section 6.4.1: fastmoe's core framework, step by step, on a batch small enough to print.

fastmoe's ``FMoETransformerMLP`` keeps its experts in a ModuleList (each an ``_Expert``: ``htoh4``,
GELU, ``h4toh``) and a ``NaiveGate`` (one ``nn.Linear`` with a bias).  One forward:

1. the gate: logits -> top-k -> ``gate_top_k_idx`` (tokens, k) and ``gate_score`` (tokens, k), a
   softmax over the k chosen logits;
2. the (token, slot) pairs sorted by expert, so that every expert's rows are contiguous
   (``fwd_expert_count`` rows each);
3. each expert on its rows;
4. the combine: each token's k outputs weighted by its scores and summed.

The script prints each step for a few tokens, checks the layer against a per-token loop over the
chosen experts (the brute-force reference), and says which fastmoe ran: the real ``fmoe`` where it
imports (it needs CUDA), else :mod:`common.fmoe`.

    python -m ch06_distributed_moe.s6_4_1_fastmoe_core
    python -m ch06_distributed_moe.s6_4_1_fastmoe_core --quick

A reader sees the ModuleList, the gate's choices and scores, the sorted order with each expert's
share of the slots, and the largest difference to the loop (about 1e-7).
"""

from __future__ import annotations

import torch

from common.fmoe.backend import fmoe_backend
from common.moe.dispatch import sort_by_expert
from common.runner import (
    checks_done,
    int_between,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)


def per_token_loop(layer, x, idx, score) -> torch.Tensor:
    """``out[t] = Σ_j score[t, j] · expert_{idx[t, j]}(x[t])``, one token and one slot at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            expert = layer.experts[int(idx[t, j])]
            out[t] += score[t, j] * expert(x[t : t + 1])[0]
    return out


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--experts", type=int_between(1, 4096), default=4, help="number of experts")
    parser.add_argument("--d-model", type=width_int, default=16, help="model width")
    parser.add_argument("--d-hidden", type=width_int, default=32, help="hidden width of each expert")
    parser.add_argument(
        "--tokens",
        type=int_between(1, 4096),  # each one printed, and checked against a per-token loop
        default=None,
        help="tokens in the batch (default 8, quick 6)",
    )
    parser.add_argument("--top-k", type=int_between(1, 4096), default=2, help="experts per token")
    args = parse_args(parser, argv)
    quick_or_full(args, tokens=(6, 8))
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top-k must be between 1 and --experts ({args.experts}), got {args.top_k}")
    checks_done(args)

    fm, backend = fmoe_backend()
    print(f"fastmoe backend: {backend}")
    torch.manual_seed(args.seed)
    layer = fm.FMoETransformerMLP(args.experts, args.d_model, args.d_hidden, top_k=args.top_k).eval()
    seen = {}
    layer.gate_hook = lambda idx, score, _: seen.update(idx=idx.detach(), score=score.detach())
    x = torch.randn(args.tokens, args.d_model)
    with torch.no_grad():
        y = layer(x)
    idx, score = seen["idx"].view(args.tokens, -1), seen["score"].view(args.tokens, -1)

    print(f"\nthe experts: {type(layer.experts).__name__} of {len(layer.experts)} x {layer.experts[0]}")
    print(f"the gate: {layer.gate.gate}")
    print("\n1. gate_top_k_idx and gate_score (softmax over the chosen logits) per token")
    for t in range(args.tokens):
        choices = ", ".join(f"expert {int(e)} x {float(s):.3f}" for e, s in zip(idx[t], score[t]))
        print(f"   token {t}: {choices}")
    order, counts, counts_list = sort_by_expert(idx, args.experts)
    print("\n2. (token, slot) pairs sorted by expert: fwd_expert_count =", counts_list)
    start = 0
    for e, n in enumerate(counts_list):
        tokens = (order[start : start + n] // args.top_k).tolist()
        print(f"   expert {e}: {n} slots ({100 * n / len(order):.0f}%), tokens {tokens}")
        start += n
    print("\n3-4. each expert on its rows, outputs weighted by gate_score and summed per token")
    with torch.no_grad():
        ref = per_token_loop(layer, x, idx, score)
    err = (y - ref).abs().max().item()
    print(f"   largest difference to the per-token loop: {err:.2e}")
    if err > 1e-4:
        raise AssertionError(f"the layer differs from the per-token loop by {err:.2e}")
    return {
        "backend": backend.split(" (")[0],
        "max_abs_diff_vs_loop": err,
        "expert_slots": " ".join(map(str, counts_list)),
        "max_share": max(counts_list) / len(order),
    }


if __name__ == "__main__":
    run_script(main)
