"""Section 4.2.2: Switch Transformer's top-1 router: capacity, dropped tokens, z-loss, jitter.

Each token goes to one expert (its argmax), weighted by that expert's probability.  Every expert has
``capacity = ceil(capacity_factor · tokens / E)`` slots; once an expert is full, later tokens that
chose it are dropped (by position) and this layer outputs zero for them, so only the residual
connection carries them on (``--dropped passthrough`` outputs their input instead, as transformers
v4 did).  The router runs in fp32; in training its input is multiplied by ``U(1-ε, 1+ε)`` noise.

The script routes one batch through a Switch layer whose router favours a few experts (as an
untrained or drifting router does) and shows:

1. the dropped fraction at capacity factors 1.0, 1.25 and 2.0 (and the loads behind it);
2. the balance loss and the router z-loss ``mean(logsumexp(logits)²)``;
3. jitter: how many tokens change expert under training noise, and that eval is noise-free.

    python -m ch04_transformer_moe.s4_2_2_switch_router
    python -m ch04_transformer_moe.s4_2_2_switch_router --quick

A reader sees a table of capacity factor / capacity / dropped fraction, the losses, the jitter
figures and ``dropped_vs_capacity.png``.
"""

from __future__ import annotations

import os

import torch

from common.moe import SwitchMoE, expert_capacity
from common.plotting import pyplot, save_figure
from common.runner import (
    checks_done,
    fraction,
    int_between,
    non_negative_float,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)

FACTORS = (1.0, 1.25, 2.0)


def plot(path: str, rows: list[dict]) -> None:
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ax.plot([r["capacity_factor"] for r in rows], [100 * r["dropped"] for r in rows], "o-")
    ax.set(xlabel="capacity factor", ylabel="tokens dropped (%)", title="Switch router: drops vs capacity")
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--d-model", type=width_int, default=None, help="model width (default 256, quick 64)")
    parser.add_argument(
        "--d-ff", type=width_int, default=None, help="width of each expert (default 1024, quick 128)"
    )
    parser.add_argument("--experts", type=int_between(1, 4096), default=16, help="number of experts")
    parser.add_argument(
        "--tokens",
        type=int_between(8, 1 << 20),
        default=None,
        help="tokens in the batch, 8 sequences: a multiple of 8 (default 4096, quick 512)",
    )
    parser.add_argument(
        "--skew", type=non_negative_float, default=0.5, help="how strongly the router favours a few experts"
    )
    parser.add_argument(
        "--jitter",
        type=fraction,
        default=0.01,
        help="multiplicative jitter epsilon: inputs scaled by U(1-eps, 1+eps) (training only)",
    )
    parser.add_argument(
        "--dropped", choices=["zero", "passthrough"], default="zero", help="what a dropped token outputs"
    )
    args = parse_args(parser, argv)
    quick_or_full(args, d_model=(64, 256), d_ff=(128, 1024), tokens=(512, 4096))
    if args.tokens % 8:
        parser.error(f"--tokens {args.tokens} must be a multiple of the 8 sequences")
    checks_done(args)

    x = torch.randn(8, args.tokens // 8, args.d_model, device=args.device)
    base = SwitchMoE(args.d_model, args.d_ff, args.experts, jitter=args.jitter, dropped=args.dropped).to(
        args.device
    )
    with torch.no_grad():  # a router that favours some experts: logit offsets along the mean input
        x += 0.2
        base.router.classifier.weight += (
            args.skew * torch.randn(args.experts, 1, device=args.device) / args.d_model
        )
    print(
        f"Switch layer: {args.experts} experts of width {args.d_ff}, {args.tokens} tokens, top-1, fp32 router"
    )

    rows = []
    print("\ncapacity factor  capacity/expert  dropped  max/mean load (before capacity)")
    for cf in FACTORS:
        layer = SwitchMoE(
            args.d_model,
            args.d_ff,
            args.experts,
            capacity_factor=cf,
            jitter=args.jitter,
            dropped=args.dropped,
        ).to(args.device)
        layer.load_state_dict(base.state_dict())
        with torch.no_grad():
            layer.eval()(x)
        chosen = torch.bincount(layer.last_routing.expert_idx.view(-1), minlength=args.experts).float()
        row = {
            "capacity_factor": cf,
            "capacity": expert_capacity(cf, args.tokens, args.experts),
            "dropped": layer.last_stats.dropped_fraction,
            "wanted_max_over_mean": float(chosen.max() / chosen.mean()),
        }
        rows.append(row)
        print(
            f"{cf:15.2f}  {row['capacity']:15d}  {100 * row['dropped']:6.2f}% "
            f" {row['wanted_max_over_mean']:.2f}"
        )

    base.train()
    torch.manual_seed(args.seed)
    base(x)
    losses, train_choice = base.last_losses, base.last_routing.expert_idx.clone()
    with torch.no_grad():
        base.eval()(x)
        eval_choice = base.last_routing.expert_idx.clone()
        base(x)
        eval_again = base.last_routing.expert_idx
    changed = float((train_choice != eval_choice).float().mean())
    print(
        f"\nbalance loss E·Σ f·P = {float(losses['balance']):.4f} (1.0 = balanced), "
        f"router z-loss = {float(losses['z']):.4f}"
    )
    print(
        f"jitter ε={args.jitter}: {100 * changed:.2f}% of tokens pick another expert in training; "
        f"eval is deterministic: {bool(torch.equal(eval_choice, eval_again))}"
    )

    plot(os.path.join(args.out, "dropped_vs_capacity.png"), rows)
    print(f"plot: {os.path.join(args.out, 'dropped_vs_capacity.png')}")
    figures = {f"dropped_cf{r['capacity_factor']:g}": r["dropped"] for r in rows}
    figures.update(
        {
            "balance_loss": float(losses["balance"]),
            "z_loss": float(losses["z"]),
            "jitter_changed_fraction": changed,
            "wanted_max_over_mean": rows[0]["wanted_max_over_mean"],
        }
    )
    return figures


if __name__ == "__main__":
    run_script(main)
