"""Section 6.4.2: DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``), the real one, on a CPU.

``MoE(hidden_size, expert, num_experts, ep_size, k, capacity_factor, eval_capacity_factor,
min_capacity, use_residual, noisy_gate_policy, drop_tokens, ...)`` returns ``(output, l_aux,
exp_counts)``.  The script runs it in worker processes joined by gloo and shows, for one batch:

1. capacity: ``capacity = max(ceil(tokens · k · factor / E), min_capacity)`` slots per expert, the
   training factor in ``train()`` and ``eval_capacity_factor`` in ``eval()``; the slots dropped at
   each setting, and none with ``drop_tokens=False``;
2. noisy gating: ``Jitter`` multiplies the gate's input by ``U(1-0.01, 1+0.01)``, ``RSample`` adds
   Gumbel noise to the logits before the top-1 choice (training only): how many tokens change expert;
3. ``use_residual`` (Residual MoE): ``out = moe(x) · c₀ + mlp(x) · c₁`` with ``c = softmax(coefficient(x))``,
   recomputed here by hand;
4. PR-MoE as DeepSpeed builds it: *more* experts in the deeper layers (DeepSpeed's own PR-MoE test
   model doubles them), every expert the same size, each layer residual.  The book describes the
   pyramid the other way round (many small experts at the bottom, few large ones at the top):
   see ERRATA.md;
5. our GShard top-2 router (:class:`common.moe.GShardRouter`) against DeepSpeed's ``top2gating`` on
   the same logits: combine weights, dropped slots and ``l_aux``;
6. ``ep_size`` 1 and 2: with ``ep_size=2`` each process holds half the experts and tokens travel by
   all-to-all; each rank's output equals the ``ep_size=1`` layer holding all experts, same weights.

With ``k=2`` DeepSpeed picks the second expert after adding Gumbel noise to the logits
(``top2_2nd_expert_sampling=True``, its default) in eval mode too, so two calls on the same input
differ; the comparisons (3, 6) turn it off.

    python -m ch06_distributed_moe.s6_4_2_deepspeed_moe_core
    python -m ch06_distributed_moe.s6_4_2_deepspeed_moe_core --quick
    torchrun --nproc_per_node 2 -m ch06_distributed_moe.s6_4_2_deepspeed_moe_core

A reader sees a capacity table, the noise policies' effect, the residual check, the PR-MoE layer
table, our router's difference to DeepSpeed's (about 1e-7) and the ep_size 2 vs 1 difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.env import require
from common.fmoe.expert_parallel import check_ep_size
from common.launch import is_main, job_size, run_workers
from common.runner import (
    checks_done,
    count_int,
    int_between,
    parse_args,
    process_count,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)

DS_LAYER = "deepspeed/moe/layer.py"  # MoE.__init__/forward: use_residual, coefficient, softmax mix
DS_PRMOE = "tests/unit/simple_model.py"  # SimplePRMoEModel: num_experts, then 2·num_experts, residual


def expert_mlp(d_model: int, d_ff: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


def make_moe(a, **kw):
    from deepspeed.moe.layer import MoE

    torch.manual_seed(a.seed)
    args = dict(
        num_experts=a.experts, ep_size=1, k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0
    )
    layer = MoE(a.d_model, expert_mlp(a.d_model, a.d_ff), **(args | kw))
    layer.set_deepspeed_parallelism()
    return layer


def kept_slots(layer, x) -> tuple[int, torch.Tensor]:
    """Slots the gate dispatches (after capacity) and the expert counts before capacity."""
    with torch.no_grad():
        _, _, dispatch_mask, exp_counts = layer.deepspeed_moe.gate(x.reshape(-1, x.shape[-1]))[:4]
    return int(dispatch_mask.sum()), exp_counts


def capacity_table(a, x) -> dict:
    tokens = x.shape[0] * x.shape[1]
    print(f"\n1. capacity ({tokens} tokens, {a.experts} experts; slots = tokens·k)")
    print("   k  mode   factor  min_cap  drop_tokens  capacity  dropped slots")
    figures = {}
    for k, mode, factor, min_cap, drop in [
        (1, "train", 1.0, 0, True),
        (1, "train", 2.0, 0, True),
        (1, "eval", 0.5, 0, True),
        (1, "train", 0.25, 64, True),
        (2, "train", 1.0, 0, True),
        (2, "train", 1.0, 0, False),
    ]:
        layer = make_moe(
            a,
            k=k,
            capacity_factor=factor,
            eval_capacity_factor=factor,
            min_capacity=min_cap,
            drop_tokens=drop,
        ).train(mode == "train")
        kept, _ = kept_slots(layer, x)
        cap = max(math.ceil(tokens * k * factor / a.experts), min_cap) if drop else "all"
        dropped = tokens * k - kept
        print(
            f"   {k}  {mode:<5}  {factor:6.2f}  {min_cap:7d}  {drop!s:<11}  {cap!s:>8}  "
            f"{dropped:5d} ({100 * dropped / (tokens * k):.0f}%)"
        )
        figures[f"dropped_k{k}_{mode}_cf{factor}_min{min_cap}_{'drop' if drop else 'nodrop'}"] = dropped
    return figures


def noise_policies(a, x) -> dict:
    flat = x.reshape(-1, a.d_model)
    base = make_moe(a, k=1).train()
    with torch.no_grad():
        clean = (flat.float() @ base.deepspeed_moe.gate.wg.weight.float().T).argmax(-1)
    figures = {}
    print("\n2. noisy gate policies (k=1, training): tokens whose expert differs from the noise-free choice")
    for policy in ("Jitter", "RSample"):
        layer = make_moe(a, k=1, noisy_gate_policy=policy, capacity_factor=float(a.experts)).train()
        torch.manual_seed(a.seed + 1)
        with torch.no_grad():
            combine = layer.deepspeed_moe.gate(flat)[1]  # (tokens, E, capacity)
        chosen = combine.sum(-1).argmax(-1)
        changed = int((chosen != clean).sum())
        print(f"   {policy:<8} {changed:4d} of {len(flat)} ({100 * changed / len(flat):.1f}%)")
        figures[f"changed_{policy}"] = changed
    return figures


def residual_check(a, x) -> float:
    layer = make_moe(
        a, use_residual=True, capacity_factor=float(a.experts), top2_2nd_expert_sampling=False
    ).eval()
    with torch.no_grad():
        out, _, _ = layer(x)
        plain = layer.deepspeed_moe(x, None)  # the MoE part alone (hidden states, used_token)
        coef = F.softmax(layer.coefficient(x), dim=-1)
        by_hand = plain * coef[..., :1] + layer.mlp(x) * coef[..., 1:]
    err = (out - by_hand).abs().max().item()
    print(
        f"\n3. use_residual: out = moe(x)·c0 + mlp(x)·c1, c = softmax(coefficient(x)) ({DS_LAYER}); "
        f"by hand vs DeepSpeed: {err:.1e}"
    )
    return err


def pr_moe(a) -> dict:
    """DeepSpeed's PR-MoE: the deeper half of the layers with twice the experts, all residual."""
    layers = []
    for i in range(a.pr_layers):
        e = a.experts if i < a.pr_layers // 2 else 2 * a.experts
        layers.append(make_moe(a, num_experts=e, use_residual=True))
    print(f"\n4. PR-MoE as DeepSpeed builds it ({DS_PRMOE}: SimplePRMoEModel; residual MoE from {DS_LAYER})")
    print("   layer  experts  params/expert  residual MLP  layer params")
    for i, layer in enumerate(layers):
        per_expert = sum(p.numel() for p in layer.deepspeed_moe.experts.deepspeed_experts[0].parameters())
        total = sum(p.numel() for p in layer.parameters())
        print(
            f"   {i:5d}  {layer.num_experts:7d}  {per_expert:13d}  "
            f"{'yes' if layer.use_residual else 'no':>12}  {total:12d}"
        )
    print(
        "   The pyramid grows with depth: more experts of the same size in the deeper layers, plus a dense\n"
        "   residual MLP in every layer. The book's 'many small experts at the bottom, few large at the\n"
        "   top' is not what DeepSpeed builds (ERRATA.md, chapter 6)."
    )
    return {"pr_moe_experts": " ".join(str(layer.num_experts) for layer in layers)}


def router_vs_deepspeed(a, x) -> dict:
    from deepspeed.moe.sharded_moe import top2gating

    from common.moe import GShardRouter

    flat = x.reshape(-1, a.d_model)
    figures = {}
    print("\n5. our GShardRouter vs DeepSpeed's top2gating on the same logits (second-expert sampling off)")
    for factor in (0.5, 1.0, 2.0):
        router = GShardRouter(a.d_model, a.experts, capacity_factor=factor, random_routing=False).train()
        with torch.no_grad():
            r = router(flat)
            l_aux, combine, dispatch_mask, _ = top2gating(
                r.logits.clone(), factor, 0, top2_2nd_expert_sampling=False
            )
        ours = torch.zeros(len(flat), a.experts).scatter_add(1, r.expert_idx, r.weights)
        err = max((ours - combine.sum(-1)).abs().max().item(), (r.losses["balance"] - l_aux).abs().item())
        kept_ours, kept_ds = int(r.keep.sum()), int(dispatch_mask.sum())
        print(
            f"   capacity factor {factor}: largest difference {err:.1e}; "
            f"kept slots ours {kept_ours}, DeepSpeed {kept_ds}"
        )
        figures[f"router_vs_ds_max_diff_cf{factor}"] = err
        if kept_ours != kept_ds or err > 1e-5:
            raise AssertionError(f"our GShard router differs from DeepSpeed's top2gating at factor {factor}")
    return figures


def _worker(ctx, a):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if ctx.device == "cpu" else "nccl")
    g = torch.Generator().manual_seed(a.seed)
    x_all = torch.randn(ctx.world_size, a.batch, a.seq, a.d_model, generator=g) + 0.3  # a skewed router input
    x = x_all[ctx.rank]
    figures = {}
    if ctx.rank == 0:
        figures |= capacity_table(a, x)
        figures |= noise_policies(a, x)
        figures["residual_max_diff"] = residual_check(a, x)
        figures |= pr_moe(a)
        figures |= router_vs_deepspeed(a, x)
    # 6. ep_size = world size: this rank's experts; the same layer with all experts as reference
    ep = ctx.world_size
    # DeepSpeed samples the second expert with Gumbel noise by default, in eval too: off for a comparison
    full = make_moe(a, capacity_factor=1.25, top2_2nd_expert_sampling=False).eval()
    sharded = make_moe(a, ep_size=ep, capacity_factor=1.25, top2_2nd_expert_sampling=False).eval()
    local = a.experts // ep
    state = {}
    for name, value in full.state_dict().items():
        head, sep, rest = name.partition("deepspeed_experts.")
        if not sep:
            state[name] = value
            continue
        e, tail = rest.split(".", 1)
        if ctx.rank * local <= int(e) < (ctx.rank + 1) * local:
            state[f"{head}deepspeed_experts.{int(e) - ctx.rank * local}.{tail}"] = value
    sharded.load_state_dict(state, strict=True)
    with torch.no_grad():
        diff = (sharded(x)[0] - full(x)[0]).abs().max().item()
    figures["ep_diff"] = diff
    return figures


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--nproc", type=process_count, default=2, help="worker processes (= ep_size of part 6)"
    )
    parser.add_argument("--experts", type=int_between(1, 4096), default=8, help="experts per MoE layer")
    parser.add_argument("--d-model", type=width_int, default=64, help="model width")
    parser.add_argument("--d-ff", type=width_int, default=128, help="hidden width of each expert")
    parser.add_argument("--batch", type=count_int, default=8, help="sequences per rank")
    parser.add_argument(
        "--seq", type=int_between(1, 1 << 16), default=None, help="tokens per sequence (default 64, quick 16)"
    )
    parser.add_argument(
        "--pr-layers",
        type=int_between(1, 256),
        default=4,
        help="layers of the PR-MoE model (the second half with twice the experts)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, seq=(16, 64))
    world = job_size(args.nproc)
    try:
        check_ep_size(world, world)
        if args.experts % world:
            raise ValueError(f"--experts {args.experts} must divide by ep_size {world} (the workers)")
    except ValueError as e:
        parser.error(str(e))
    require("deepspeed")  # or skip with the reason
    checks_done(args)
    device = "cuda" if args.device == "cuda" else "cpu"
    results = run_workers(_worker, args.nproc, (args,), device=device, timeout=600)
    if not is_main():
        return {}
    figures = results[0]
    diffs = [r["ep_diff"] for r in results]
    print(
        f"\n6. ep_size {world} vs ep_size 1 (all experts on every rank, same weights): largest output "
        f"difference over the ranks {max(diffs):.1e}"
    )
    figures["ep_size"] = world
    figures["ep_vs_single_max_diff"] = max(diffs)
    figures.pop("ep_diff")
    return figures


if __name__ == "__main__":
    run_script(main)
