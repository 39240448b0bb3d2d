"""Section 4.2.3: GShard's top-2 router: capacity, random routing of the second expert, balance loss.

Each token picks its two most probable experts (p1 ≥ p2).  In training, the second expert is kept
only with probability ``min(1, 2·p2)`` (random routing): a token whose second choice is weak mostly
uses one expert, which saves compute and capacity.  Every expert has ``ceil(capacity_factor · 2 ·
tokens / E)`` slots; all first choices are placed before any second choice, so under pressure the
second choices are dropped first.  The two weights are ``g1/(g1+g2)`` and ``g2/(g1+g2)`` after the
drops (a token that lost its second expert puts all its weight on the first).  The balance loss
``E · Σ f_e P_e`` counts the first choices only, as DeepSpeed's ``top2gating`` does.

    python -m ch04_transformer_moe.s4_2_3_gshard_top2
    python -m ch04_transformer_moe.s4_2_3_gshard_top2 --quick

A reader sees, for capacity factors 0.5 / 1.0 / 2.0 and random routing on and off: the share of
first and second choices that were dropped and the expert-slots computed; the kept fraction of
second experts against its expectation ``mean(min(1, 2·p2))``; the balance loss; and
``top2_drops.png``.
"""

from __future__ import annotations

import os

import torch

from common.moe import GShardMoE, expert_capacity
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

FACTORS = (0.5, 1.0, 2.0)


def plot(path: str, rows: list[dict]) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for rr in (False, True):
        sel = [r for r in rows if r["random_routing"] == rr]
        label = "random routing" if rr else "always both"
        ax.plot(
            [r["capacity_factor"] for r in sel],
            [100 * r["first_dropped"] for r in sel],
            "o-",
            label=f"first choices dropped ({label})",
        )
        ax.plot(
            [r["capacity_factor"] for r in sel],
            [100 * r["second_dropped"] for r in sel],
            "s--",
            label=f"second choices not computed ({label})",
        )
    ax.set(xlabel="capacity factor", ylabel="%", title="GShard top-2: what does not get an expert")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--d-model", type=width_int, default=None, help="model width (default 256, quick 64)")
    parser.add_argument(
        "--d-ff", type=width_int, default=None, help="width of each expert (default 1024, quick 128)"
    )
    parser.add_argument(
        "--experts", type=int_between(2, 4096), default=16, help="number of experts (top-2 needs two)"
    )
    parser.add_argument(
        "--tokens",
        type=int_between(1, 1 << 20),
        default=None,
        help="tokens in the batch (default 4096, quick 512)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, d_model=(64, 256), d_ff=(128, 1024), tokens=(512, 4096))
    checks_done(args)

    x = (
        torch.randn(1, args.tokens, args.d_model, device=args.device) + 0.2
    )  # a shared direction: some imbalance
    base = GShardMoE(args.d_model, args.d_ff, args.experts, seed=args.seed).to(args.device)
    print(f"GShard layer: {args.experts} experts of width {args.d_ff}, top-2, {args.tokens} tokens")
    rows = []
    print("\nrandom routing  capacity factor  capacity  1st dropped  2nd not computed  slots computed")
    for random_routing in (False, True):
        for cf in FACTORS:
            layer = GShardMoE(
                args.d_model,
                args.d_ff,
                args.experts,
                capacity_factor=cf,
                random_routing=random_routing,
                seed=args.seed,
            ).to(args.device)
            layer.load_state_dict(base.state_dict())
            with torch.no_grad():
                layer.train()(x)  # training mode: random routing is on when asked
            r = layer.last_routing
            row = {
                "random_routing": random_routing,
                "capacity_factor": cf,
                "first_dropped": float((~r.keep[:, 0]).float().mean()),
                "second_dropped": float((~r.keep[:, 1]).float().mean()),
                "slots_computed": int(layer.last_stats.counts.sum()),
                "balance_loss": float(layer.last_losses["balance"]),
            }
            rows.append(row)
            cap = expert_capacity(cf, args.tokens, args.experts, k=2)
            print(
                f"{str(random_routing):>14}  {cf:15.2f}  {cap:8d}  {100 * row['first_dropped']:10.2f}%  "
                f"{100 * row['second_dropped']:15.2f}%  {row['slots_computed']:14d}"
            )

    p2 = r.logits.softmax(-1).topk(2).values[:, 1]
    expected = float(torch.clamp(2 * p2, max=1).mean())
    big = GShardMoE(
        args.d_model, args.d_ff, args.experts, capacity_factor=float(args.experts), seed=args.seed
    )
    big.load_state_dict(base.state_dict())
    with torch.no_grad():
        big.to(args.device).train()(x)
        kept = float(big.last_routing.keep[:, 1].float().mean())
        big.eval()(x)
        kept_eval = float(big.last_routing.keep[:, 1].float().mean())
    print(
        f"\nrandom routing, no capacity limit: {100 * kept:.1f}% of second experts kept "
        f"(expected mean(min(1, 2·p2)) = {100 * expected:.1f}%); in eval {100 * kept_eval:.0f}%"
    )
    print(f"balance loss E·Σ f·P (first choices) = {rows[0]['balance_loss']:.4f} (1.0 = balanced)")

    plot(os.path.join(args.out, "top2_drops.png"), rows)
    print(f"plot: {os.path.join(args.out, 'top2_drops.png')}")
    figures = {}
    for row in rows:
        tag = f"{'rr' if row['random_routing'] else 'both'}_cf{row['capacity_factor']:g}"
        figures[f"first_dropped_{tag}"] = row["first_dropped"]
        figures[f"second_dropped_{tag}"] = row["second_dropped"]
    figures.update(
        {
            "second_kept_random": kept,
            "second_kept_expected": expected,
            "second_kept_eval": kept_eval,
            "balance_loss": rows[0]["balance_loss"],
        }
    )
    return figures


if __name__ == "__main__":
    run_script(main)
