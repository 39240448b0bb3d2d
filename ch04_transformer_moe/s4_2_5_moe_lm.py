"""Section 4.2.5 (reader project): a Mixture-of-Experts language model against a dense one.

The decoder LM of section 4.1 (:class:`common.models.decoder.DecoderLM`) with its feed-forwards
replaced by top-k MoE layers (plugged in through ``ffn_factory``), in every layer or every other one
(``--every 2``), optionally keeping the first layers dense (``--first-dense``, as DeepSeek-V3 does).
Each MoE layer's balance loss ``E · Σ f·P`` (times ``--balance-coef``) is added to the LM loss;
DecoderLM sums it over the layers.

Both models train on the embedded corpus for the same steps, with the same data order and AdamW
(the stacked 3-D expert weights are not Muon's 2-D matrices: under Muon they would fall to AdamW
while the dense model's matrices got Muon, so neither model uses Muon).  The dense model's
feed-forward width is ``k · d_expert``: the same active parameters per token.

Routing is Mixtral's (softmax over the experts, top-k, weights renormalised to sum to 1), and the
routed output is multiplied by ``--routed-scale`` (default k), DeepSeek's ``routed_scaling_factor``
(:class:`common.moe.DeepSeekMoE` with softmax scoring and no shared expert).  Why: a dense SwiGLU of
width ``k · d_expert`` *adds* k blocks of width ``d_expert``, while renormalised weights *average*
k experts, so at the same initialisation the MoE's feed-forward output is 1/k of the dense one's,
and AdamW, whose steps have a fixed size, takes that much longer to grow it.  The script measures
the two outputs at initialisation; ``--routed-scale 1`` gives Mixtral's convention and the lag.

    python -m ch04_transformer_moe.s4_2_5_moe_lm                 # 4 layers x 128, 8 experts top-2
    python -m ch04_transformer_moe.s4_2_5_moe_lm --every 2 --first-dense 1
    python -m ch04_transformer_moe.s4_2_5_moe_lm --routed-scale 1  # Mixtral's convention: the MoE lags
    python -m ch04_transformer_moe.s4_2_5_moe_lm --quick

A reader sees both models' sizes (the MoE's total vs active parameters), the feed-forward output
scale of both at initialisation, two progress bars, the validation loss and bits per byte of both,
the balance loss and expert loads of every MoE layer, and ``val_loss.png`` (both curves).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from common.data import TokenData, get_tokenizer, load_corpus
from common.moe import DeepSeekMoE, MoELayer, merge_loads
from common.plotting import pyplot, save_figure
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    int_between,
    non_negative_float,
    non_negative_int,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import TrainConfig, train

TINY = dict(n_layer=4, d_model=128, n_head=4, n_kv_head=4)
QUICK = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=2)


def moe_factory(args, n_layer: int):
    """``ffn_factory`` for DecoderLM: a top-k MoE layer in the chosen layers, None (dense) elsewhere.

    The routed output is multiplied by ``args.routed_scale``, or by k when that is None."""
    scale = float(args.k) if args.routed_scale is None else args.routed_scale

    def factory(layer_idx: int, config) -> nn.Module | None:
        if layer_idx < args.first_dense or (layer_idx - args.first_dense) % args.every:
            return None
        layer = DeepSeekMoE(  # softmax top-k, renormalised (Mixtral), times routed_scaling_factor
            config.d_model,
            args.d_expert,
            args.experts,
            args.k,
            n_shared=0,
            scoring="softmax",
            routed_scaling_factor=scale,
            balance_coef=args.balance_coef,
        )
        # the dense LM's initialisation (GPT-2 style) for every weight
        nn.init.normal_(layer.router.weight, std=0.02)
        nn.init.normal_(layer.experts.gate_up, std=0.02)
        nn.init.normal_(layer.experts.down, std=0.02 / math.sqrt(2 * n_layer))
        return layer

    return factory


def active_params(model: nn.Module) -> int:
    """Parameters a token uses: everything except the experts it was not routed to."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, MoELayer):
            expert = (m.experts.gate_up.numel() + m.experts.down.numel()) // m.experts.num_experts
            total -= expert * (m.experts.num_experts - m.router.k)
    return total


@torch.no_grad()
def ffn_output_rms(model: nn.Module, x: torch.Tensor) -> float:
    """RMS of the first block's feed-forward output on the normalised embeddings of ``x``."""
    block = model.blocks[0]
    out, _aux_loss = block.feed_forward(block.norm2(model.tok_emb(x)))  # dense or MoE alike
    return out.pow(2).mean().sqrt().item()


def plot(path: str, results: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for name, r in results.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], alpha=0.4, label=f"{name} train")
        ax.plot(
            [v["step"] for v in r["val"]], [v["loss"] for v in r["val"]], "o-", label=f"{name} validation"
        )
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats per token)",
        title="MoE LM vs dense LM, same active parameters",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> dict:
    from common.models.decoder import DecoderConfig, DecoderLM

    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--experts",
        type=int_between(1, 4096),
        default=None,
        help="experts per MoE layer (default 8, quick 4)",
    )
    parser.add_argument("--k", type=int_between(1, 4096), default=2, help="experts per token")
    parser.add_argument(
        "--d-expert",
        type=width_int,
        default=None,
        help="width of one expert (dense width = k·d_expert; default 192, quick 64)",
    )
    parser.add_argument(
        "--every", type=positive_int, default=1, help="MoE in every n-th layer (1: all, 2: every other)"
    )
    parser.add_argument(
        "--first-dense", type=non_negative_int, default=0, help="keep the first n layers dense"
    )
    parser.add_argument(
        "--balance-coef", type=non_negative_float, default=0.01, help="coefficient of the balance loss"
    )
    parser.add_argument(
        "--routed-scale",
        type=positive_float,
        default=None,
        help="multiplies the routed output (DeepSeek's routed_scaling_factor; default k, 1 = Mixtral)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps of each model (default 300, quick 12)",
    )
    parser.add_argument(
        "--batch-size", type=count_int, default=None, help="sequences per step (default 32, quick 8)"
    )
    parser.add_argument(
        "--context", type=count_int, default=None, help="context length in tokens (default 128, quick 64)"
    )
    parser.add_argument(
        "--vocab-size",
        type=int_between(257, 65536),
        default=None,
        help="BPE vocabulary (default 2048, quick 512)",
    )
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate")
    args = parse_args(parser, argv)
    sizes = QUICK if args.quick else TINY
    quick_or_full(args, experts=(4, 8), d_expert=(64, 192), steps=(12, 300), batch_size=(8, 32))
    quick_or_full(args, context=(64, 128), vocab_size=(512, 2048))

    text = load_corpus()
    tokenizer = get_tokenizer(args.vocab_size, text=text)
    data = TokenData.from_text(text, tokenizer, context_length=args.context)
    base = dict(vocab_size=args.vocab_size, context_length=args.context, **sizes)
    if args.first_dense >= base["n_layer"]:
        parser.error(f"--first-dense {args.first_dense} leaves no MoE layer in {base['n_layer']} layers")
    try:
        config = DecoderConfig(**base, d_ff=args.k * args.d_expert)  # also the MoE LM's dense layers
        torch.manual_seed(args.seed)
        dense = DecoderLM(config)
        torch.manual_seed(args.seed)
        moe = DecoderLM(config, ffn_factory=moe_factory(args, base["n_layer"]))
    except ValueError as e:
        parser.error(str(e))
    checks_done(args)
    moe_layers = [m for m in moe.modules() if isinstance(m, MoELayer)]
    routed_scale = moe_layers[0].router.routed_scaling_factor
    print(
        f"data: {len(data.train):,} training / {len(data.val):,} "
        f"validation tokens, vocabulary {args.vocab_size}"
    )
    print(
        f"dense LM: {base['n_layer']} layers x {base['d_model']}, SwiGLU width {args.k * args.d_expert}: "
        f"{dense.num_params():,} parameters, all active"
    )
    print(
        f"MoE LM:   {len(moe_layers)} of {base['n_layer']} layers MoE ({args.experts} experts of width "
        f"{args.d_expert}, top-{args.k}): {moe.num_params():,} "
        f"parameters, {active_params(moe):,} active per token"
    )
    x0, _ = data.get_batch("train", args.batch_size, generator=torch.Generator().manual_seed(args.seed))
    rms_dense, rms_moe = ffn_output_rms(dense, x0), ffn_output_rms(moe, x0)
    print(
        f"feed-forward output at initialisation (first layer, RMS): dense {rms_dense:.2e}, MoE {rms_moe:.2e} "
        f"(ratio {rms_moe / rms_dense:.2f}; routed output times {routed_scale:g})"
    )

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        use_muon=False,
        warmup_steps=min(10, args.steps // 4),
        eval_every=max(1, args.steps // 4),
        eval_batches=4 if args.quick else 16,
        seed=args.seed,
        dtype=args.dtype,
    )
    results = {}
    for name, model in (("dense", dense), ("MoE", moe)):
        print(
            f"\ntraining the {name} LM: {cfg.steps} steps x {cfg.batch_size} x {args.context} tokens, AdamW"
        )
        results[name] = train(model, data, cfg, device=args.device)
        print(
            f"{name}: validation loss {results[name]['val_loss']:.4f}, bpb {results[name]['val_bpb']:.4f}, "
            f"{results[name]['tokens_per_second']:,.0f} tokens/s"
        )

    # balance loss and loads of every MoE layer on one validation batch (training-mode routing)
    x, y = next(data.val_batches(cfg.batch_size, 1))
    moe.train()
    with torch.no_grad():
        logits, loss = moe(x.to(args.device), y.to(args.device))
    aux = float(loss - nn.functional.cross_entropy(logits.flatten(0, 1), y.to(args.device).flatten()))
    print(
        f"\nbalance loss summed over {len(moe_layers)} MoE layers: "
        f"{aux / args.balance_coef if args.balance_coef else 0:.4f} "
        f"(1.0 per layer is perfect balance); times the coefficient, added to the loss: {aux:.5f}"
    )
    for i, layer in enumerate(moe_layers):
        s = layer.last_stats
        print(
            f"  MoE layer {i}: tokens per expert {s.counts.tolist()}, "
            f"max/mean {s.max_over_mean:.2f}, cv {s.cv:.2f}"
        )
    loads = merge_loads([layer.last_stats for layer in moe_layers])

    plot(os.path.join(args.out, "val_loss.png"), results)
    print(
        f"\nvalidation loss: dense {results['dense']['val_loss']:.4f} "
        f"vs MoE {results['MoE']['val_loss']:.4f} "
        f"after {cfg.steps} steps; plot: {os.path.join(args.out, 'val_loss.png')}"
    )
    return {
        "dense_val_loss": results["dense"]["val_loss"],
        "moe_val_loss": results["MoE"]["val_loss"],
        "dense_val_bpb": results["dense"]["val_bpb"],
        "moe_val_bpb": results["MoE"]["val_bpb"],
        "dense_params": dense.num_params(),
        "moe_params_total": moe.num_params(),
        "moe_params_active": active_params(moe),
        "moe_layers": len(moe_layers),
        "routed_scale": routed_scale,
        "init_ffn_rms_ratio_moe_over_dense": rms_moe / rms_dense,
        "balance_loss_sum": aux / args.balance_coef if args.balance_coef else 0.0,
        "max_over_mean_worst": loads["max_over_mean_worst"],
        "dense_tokens_per_second": results["dense"]["tokens_per_second"],
        "moe_tokens_per_second": results["MoE"]["tokens_per_second"],
    }


if __name__ == "__main__":
    run_script(main)
