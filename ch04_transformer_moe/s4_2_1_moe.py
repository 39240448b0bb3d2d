"""Section 4.2.1: the basic Mixture-of-Experts layer.

A router scores every token against E experts (softmax over all of them), keeps the top-k,
renormalises their probabilities (Mixtral's convention) and sends the token to those k experts;
the layer's output is the weighted sum of their outputs.  The script shows, on one batch:

1. the routing of a few tokens (chosen experts and weights);
2. the readable reference, a dense loop that runs every expert on every token, and the fast
   dispatch of :mod:`common.moe.dispatch` (tokens sorted by expert, one contiguous slice per
   expert): the same output and gradients, and how long each takes here;
3. the load-balancing loss ``E · Σ_e f_e · P_e`` (1.0 = perfectly balanced) and the router z-loss;
4. the expert loads (tokens per expert, max/mean, coefficient of variation), as a bar chart.

    python -m ch04_transformer_moe.s4_2_1_moe            # d_model 256, 8 experts, top-2, 2048 tokens
    python -m ch04_transformer_moe.s4_2_1_moe --quick

A reader sees the routing table, the max difference fast vs loop (~1e-7), the two timings, the
losses and loads, and ``expert_load.png`` in the output folder.
"""

from __future__ import annotations

import os
import time

import torch

from common.moe import TopKMoE
from common.plotting import pyplot, save_figure
from common.runner import (
    checks_done,
    int_between,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)


def plot_loads(path: str, counts: list[int], k: int) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.bar(range(len(counts)), counts)
    ax.axhline(sum(counts) / len(counts), color="k", ls="--", label="perfect balance")
    ax.set(xlabel="expert", ylabel="tokens routed", title=f"Expert load, top-{k} routing (untrained router)")
    ax.legend()
    save_figure(fig, path)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--d-model", type=width_int, default=None, help="model width (default 256, quick 64)")
    parser.add_argument(
        "--d-ff", type=width_int, default=None, help="width of each expert (default 512, quick 128)"
    )
    parser.add_argument("--experts", type=int_between(1, 4096), default=8, help="number of experts E")
    parser.add_argument(
        "--k", type=int_between(1, 4096), default=2, help="experts per token (top-k), at most E"
    )
    parser.add_argument(
        "--tokens",
        type=int_between(8, 1 << 20),
        default=None,
        help="tokens in the batch, 8 sequences: a multiple of 8 (default 2048, quick 256)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, d_model=(64, 256), d_ff=(128, 512), tokens=(256, 2048))
    if args.k > args.experts:
        parser.error(f"--k {args.k} must be at most --experts {args.experts}")
    if args.tokens % 8:
        parser.error(f"--tokens {args.tokens} must be a multiple of the 8 sequences")
    checks_done(args)

    layer = TopKMoE(args.d_model, args.d_ff, args.experts, args.k, balance_coef=0.01, z_coef=0.001).to(
        args.device
    )
    x = torch.randn(8, args.tokens // 8, args.d_model, device=args.device)
    print(
        f"MoE layer: {args.experts} SwiGLU experts of width "
        f"{args.d_ff}, top-{args.k}, d_model {args.d_model}; "
        f"{sum(p.numel() for p in layer.parameters()):,} parameters, "
        f"{args.k}/{args.experts} of the expert parameters active per token"
    )

    # 1. routing of the first tokens
    layer.train()
    out, _ = layer(x)  # the output and the auxiliary loss; the routing is recorded on the layer
    r = layer.last_routing
    print("\ntoken  chosen experts  weights (renormalised top-k softmax)")
    for t in range(4):
        print(f"{t:5d}  {str(r.expert_idx[t].tolist()):<14}  {[round(w, 3) for w in r.weights[t].tolist()]}")

    # 2. the dense loop (reference) vs the fast dispatch: forward and gradients
    probe = torch.randn(x.shape, device=args.device)

    def fwd_bwd(reference: bool):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(args.seed)
        y, _ = layer(xi, reference=reference)
        (y * probe).sum().backward()  # a fixed random direction: O(1) gradients
        return y.detach(), xi.grad, layer.experts.gate_up.grad.clone(), layer.router.weight.grad.clone()

    fwd_bwd(False), fwd_bwd(True)  # warm-up
    fast, t_fast = timed(lambda: fwd_bwd(False))
    loop, t_loop = timed(lambda: fwd_bwd(True))
    diffs = [float((a - b).abs().max()) for a, b in zip(fast, loop)]
    print(
        f"\nfast dispatch vs dense loop: max |difference| output {diffs[0]:.1e}, d/dx {diffs[1]:.1e}, "
        f"d/d(expert weights) {diffs[2]:.1e}, d/d(router) {diffs[3]:.1e}"
    )
    print(
        f"forward+backward here: dense loop {1e3 * t_loop:.1f} ms (every expert on every token), "
        f"dispatch {1e3 * t_fast:.1f} ms (each token only through its {args.k} experts)"
    )

    # 3. losses and 4. loads
    _, aux_loss = layer(x)
    losses, stats, aux = layer.last_losses, layer.last_stats, float(aux_loss.detach())
    print(
        f"\nbalance loss E·Σ f·P = {float(losses['balance']):.4f} (1.0 is perfect balance), "
        f"z-loss = {float(losses['z']):.4f}, aux_loss added to the LM loss = {aux:.5f}"
    )
    counts = stats.counts.tolist()
    print(f"tokens per expert: {counts}")
    print(f"max/mean load {stats.max_over_mean:.3f}, coefficient of variation {stats.cv:.3f}")
    plot_loads(os.path.join(args.out, "expert_load.png"), counts, args.k)
    print(f"plot: {os.path.join(args.out, 'expert_load.png')}")
    return {
        "max_diff_output": diffs[0],
        "max_diff_grad_x": diffs[1],
        "max_diff_grad_experts": diffs[2],
        "max_diff_grad_router": diffs[3],
        "loop_ms": 1e3 * t_loop,
        "dispatch_ms": 1e3 * t_fast,
        "balance_loss": float(losses["balance"]),
        "z_loss": float(losses["z"]),
        "max_over_mean": stats.max_over_mean,
        "cv": stats.cv,
        "out_shape": list(out.shape),
    }


if __name__ == "__main__":
    run_script(main)
