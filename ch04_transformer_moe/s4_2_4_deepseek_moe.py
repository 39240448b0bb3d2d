"""Section 4.2.4: DeepSeekMoE: fine-grained and shared experts, group-limited routing, and
auxiliary-loss-free load balancing.

1. Fine-grained experts: split each of N experts of width d_ff into m experts of width d_ff/m and
   route to m·k of the m·N: the same active parameters per token, many more combinations.
   Shared experts run on every token, next to the routed ones.
2. Group-limited routing (V3): the experts form ``n_group`` groups; a token first keeps its
   ``topk_group`` best groups (a group's score is the sum of its two best experts' scores) and picks
   its experts only there, which bounds how many devices a token talks to.
3. V3 scoring: sigmoid affinities; experts are chosen on ``score + b`` but weighted by the unbiased
   score.  The bias ``b`` is the auxiliary-loss-free balancer: after every training step,
   ``b_i -= γ`` for each overloaded expert and ``+= γ`` for each underloaded one, outside autograd.
   A short training run (a DeepSeekMoE layer fitting a fixed random teacher, inputs sharing a common
   direction so that a few experts win every token) shows max/mean expert load with and without the
   bias update, no auxiliary loss in either.

This is DeepSeek-V3's MoE layer, which DeepSeek-V3.2 keeps unchanged (tests/test_moe_reference.py
checks it against transformers' DeepseekV3MoE and the MoE block of DeepseekV32ForCausalLM). It is not
the "DeepSeek v3.2 architecture" the book's code names: multi-head latent attention, multi-token
prediction and V3.2's sparse attention are not here (ERRATA.md, chapter 4).

    python -m ch04_transformer_moe.s4_2_4_deepseek_moe
    python -m ch04_transformer_moe.s4_2_4_deepseek_moe --quick

A reader sees the parameter counts (total, active per token), the groups each token used, the
load imbalance at the start and end of both runs, the fit loss of both, and ``load_balance.png``.
"""

from __future__ import annotations

import os

import torch

from common.moe import DeepSeekMoE
from common.plotting import pyplot, save_figure
from common.progress import progress
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    int_between,
    non_negative_float,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import autocast_for


def plot(path: str, curves: dict[str, list[float]]) -> None:
    fig, ax = pyplot().subplots(figsize=(6.5, 3.8))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set(
        xlabel="training step",
        ylabel="max / mean expert load",
        yscale="log",
        title="DeepSeek-V3 auxiliary-loss-free balancing (no aux loss in either run)",
    )
    ax.legend()
    save_figure(fig, path)


def build(args, gamma: float) -> DeepSeekMoE:
    torch.manual_seed(args.seed)
    return DeepSeekMoE.fine_grained(
        args.d_model,
        args.d_ff,
        args.experts,
        args.k,
        args.m,
        n_shared=args.shared,
        n_group=args.n_group,
        topk_group=args.topk_group,
        bias_update_speed=gamma,
    ).to(args.device)


def train_run(args, gamma: float, x_all: torch.Tensor, teacher: torch.nn.Module, desc: str):
    layer = build(args, gamma).train()
    opt = torch.optim.AdamW(layer.parameters(), lr=args.lr)
    imbalance, losses = [], []
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    for _ in progress(range(args.steps), desc=desc, leave=False):
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=g, device=args.device)
        x = x_all[idx]  # (batch, seq, d_model)
        with torch.no_grad():
            y = teacher(x)
        with autocast_for(args.device, args.dtype):
            out, _ = layer(x)  # its auxiliary loss is not added
        loss = (out.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        imbalance.append(layer.last_stats.max_over_mean)
        losses.append(loss.item())
    return layer, imbalance, losses


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument("--d-model", type=width_int, default=None, help="model width (default 128, quick 32)")
    parser.add_argument(
        "--d-ff",
        type=width_int,
        default=None,
        help="width of one coarse expert before splitting (default 512, quick 128)",
    )
    experts = int_between(1, 4096)
    parser.add_argument(
        "--experts", type=experts, default=8, help="coarse experts N (m·N fine-grained experts)"
    )
    parser.add_argument(
        "--k", type=experts, default=1, help="coarse top-k (m·k fine-grained experts per token)"
    )
    parser.add_argument(
        "--m",
        type=int_between(1, 256),
        default=4,
        help="fine-grained split: each expert becomes m of width d_ff/m",
    )
    parser.add_argument(
        "--shared", type=int_between(0, 4096), default=1, help="shared experts (of the fine-grained width)"
    )
    parser.add_argument("--n-group", type=experts, default=4, help="expert groups")
    parser.add_argument("--topk-group", type=experts, default=2, help="groups each token may use")
    parser.add_argument(
        "--gamma", type=non_negative_float, default=1e-2, help="bias update speed γ (0: no bias)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="training steps of each run (default 300, quick 60)"
    )
    parser.add_argument(
        "--batch", type=count_int, default=None, help="sequences per step (default 16, quick 8)"
    )
    parser.add_argument(
        "--seq", type=int_between(1, 1 << 16), default=None, help="tokens per sequence (default 64, quick 32)"
    )
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate")
    args = parse_args(parser, argv)
    quick_or_full(args, d_model=(32, 128), d_ff=(128, 512), steps=(60, 300), batch=(8, 16), seq=(32, 64))
    try:
        layer = build(args, args.gamma)
    except ValueError as e:
        parser.error(str(e))
    checks_done(args)
    n_fine, k_fine, d_fine = args.experts * args.m, args.k * args.m, args.d_ff // args.m
    routed = layer.experts.gate_up.numel() + layer.experts.down.numel()
    shared = sum(p.numel() for p in layer.shared.parameters()) if layer.shared is not None else 0
    active = routed * k_fine // n_fine + shared
    print(
        "DeepSeek-V3's MoE layer (V3.2 keeps it); not the whole V3.2 architecture: no latent attention, "
        "multi-token prediction or sparse attention (ERRATA.md)"
    )
    print(
        f"fine-grained: {args.experts} experts of width {args.d_ff}, top-{args.k} -> split m={args.m}: "
        f"{n_fine} experts of width {d_fine}, top-{k_fine}; {args.shared} shared expert(s) of width {d_fine}"
    )
    print(
        f"parameters: routed {routed:,} + shared {shared:,} (+ router {layer.router.weight.numel():,}); "
        f"active per token {active:,} ({100 * active / (routed + shared):.1f}%)"
    )

    # group-limited routing on one batch
    torch.manual_seed(args.seed)
    common = torch.randn(args.d_model, device=args.device)  # a direction every token shares
    x_all = torch.randn(256, args.seq, args.d_model, device=args.device) + 0.5 * common
    with torch.no_grad():
        layer.eval()(x_all[:4])
    per_group = n_fine // args.n_group
    groups = layer.last_routing.expert_idx // per_group
    used = [len(set(row)) for row in groups.tolist()]
    print(
        f"group-limited routing: {args.n_group} groups of {per_group} experts, topk_group={args.topk_group}: "
        f"tokens used at most {max(used)} group(s) (mean {sum(used) / len(used):.2f})"
    )

    torch.manual_seed(args.seed + 1)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(args.d_model, 2 * args.d_model),
        torch.nn.GELU(),
        torch.nn.Linear(2 * args.d_model, args.d_model),
    ).to(args.device)
    print(
        f"\ntraining {args.steps} steps twice, no auxiliary "
        f"loss: without and with the bias update (γ={args.gamma})"
    )
    _, plain, loss_plain = train_run(args, 0.0, x_all, teacher, "no bias update")
    trained, biased, loss_biased = train_run(args, args.gamma, x_all, teacher, "bias update")
    tail = max(1, args.steps // 10)
    mean_tail = lambda v: sum(v[-tail:]) / tail  # noqa: E731 - a one-line average of the last steps
    print(f"max/mean load, first step -> mean of the last {tail} steps:")
    print(
        f"  without bias update: {plain[0]:.2f} -> {mean_tail(plain):.2f} "
        f"  (fit loss {mean_tail(loss_plain):.4f})"
    )
    print(
        f"  with bias update:    {biased[0]:.2f} -> "
        f"{mean_tail(biased):.2f}   (fit loss {mean_tail(loss_biased):.4f})"
    )
    b = trained.router.e_score_correction_bias
    print(
        f"learned bias: min {float(b.min()):+.4f}, max "
        f"{float(b.max()):+.4f} (requires_grad={b.requires_grad})"
    )

    plot(
        os.path.join(args.out, "load_balance.png"),
        {"no bias update": plain, f"bias update γ={args.gamma:g}": biased},
    )
    print(f"plot: {os.path.join(args.out, 'load_balance.png')}")
    return {
        "experts_fine": n_fine,
        "k_fine": k_fine,
        "params_total": routed + shared,
        "params_active": active,
        "max_groups_used": max(used),
        "imbalance_start": plain[0],
        "imbalance_end_no_bias": mean_tail(plain),
        "imbalance_end_bias": mean_tail(biased),
        "fit_loss_no_bias": mean_tail(loss_plain),
        "fit_loss_bias": mean_tail(loss_biased),
    }


if __name__ == "__main__":
    run_script(main)
