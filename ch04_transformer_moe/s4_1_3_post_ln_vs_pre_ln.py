"""Section 4.1.3: Post-LN vs Pre-LN, where the layer norm sits and why warm-up used to be needed.

The 2017 Transformer normalises after each residual addition (Post-LN: ``x = norm(x + f(x))``);
GPT-2 and every LLM since normalise the input of each sublayer (Pre-LN: ``x = x + f(norm(x))``).
Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") showed that at
initialisation Post-LN's gradients are largest near the output and shrink toward the input, so a
large learning rate without warm-up upsets the top layers, while Pre-LN's gradients are about the
same in every layer.  This script measures both claims on two decoder LMs
(:class:`common.models.decoder.DecoderLM` with ``norm_placement="post"`` and ``"pre"``, otherwise
identical and identically initialised) on the embedded corpus:

1. the gradient norm of each layer's parameters at initialisation, averaged over a few batches;
2. both trained with AdamW at a high learning rate, no warm-up, the same batches and steps.

    python -m ch04_transformer_moe.s4_1_3_post_ln_vs_pre_ln            # the book's run (a few minutes)
    python -m ch04_transformer_moe.s4_1_3_post_ln_vs_pre_ln --quick    # a small run in seconds
    python -m ch04_transformer_moe.s4_1_3_post_ln_vs_pre_ln --lr 1e-2  # push harder

A reader sees a table of per-layer gradient norms for both models, the ratio of the last layer's to
the first layer's, both loss curves summarised (and whether one diverged), and ``post_vs_pre_ln.png``
with the two panels in the output folder.  Nothing is asserted: the figures are what this run measured.
"""

from __future__ import annotations

import math
import os

import torch

from common.data import TokenData, get_tokenizer, load_corpus
from common.plotting import pyplot, save_figure
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    parse_args,
    positive_float,
    positive_int,
    run_script,
    script_parser,
    width_int,
)
from common.training import TrainConfig, train


def init_like_2017(model) -> None:
    """The original Transformer's initialisation, the setting Xiong et al. analyse: Xavier-uniform
    matrices, zero biases, and embeddings of unit scale (the 2017 model multiplies its embeddings by
    sqrt(d_model)).  DecoderLM's own GPT-2 initialisation (std 0.02, down-scaled residual projections)
    already tames Post-LN, which would hide the effect."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)


def layer_grad_norms(model, batches) -> list[float]:
    """Mean over ``batches`` of each block's gradient norm (all its parameters together), current weights."""
    totals = torch.zeros(len(model.blocks))
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        for i, block in enumerate(model.blocks):
            grads = [p.grad.flatten() for p in block.parameters() if p.grad is not None]
            totals[i] += torch.cat(grads).norm()
    model.zero_grad(set_to_none=True)
    return (totals / len(batches)).tolist()


def plot(path, grad_norms: dict, curves: dict, lr: float) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4))
    for name, norms in grad_norms.items():
        left.plot(range(1, len(norms) + 1), norms, marker="o", label=name)
    left.set(
        xlabel="layer (1 = next to the input)",
        ylabel="gradient norm at initialisation",
        title="Gradients per layer at initialisation",
        yscale="log",
    )
    left.legend()
    for name, losses in curves.items():
        right.plot(range(1, len(losses) + 1), losses, label=name)
    right.set(xlabel="step", ylabel="training loss", title=f"AdamW, lr {lr:g}, no warm-up")
    right.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    from common.models.decoder import DecoderConfig, DecoderLM

    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument("--layers", type=count_int, default=None, help="decoder layers (default 8; quick 3)")
    parser.add_argument("--d-model", type=width_int, default=None, help="model width (default 128; quick 64)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps for each model (default 300; quick 15)",
    )
    parser.add_argument(
        "--lr", type=positive_float, default=3e-3, help="AdamW learning rate, used from step 0 (no warm-up)"
    )
    parser.add_argument(
        "--batch-size", type=count_int, default=None, help="sequences per step (default 16; quick 8)"
    )
    parser.add_argument(
        "--init",
        choices=["2017", "gpt2"],
        default="2017",
        help="weights at the start: the 2017 Transformer's (Xavier, unit embeddings; the "
        "paper's setting) or DecoderLM's GPT-2 style default",
    )
    parser.add_argument(
        "--grad-batches", type=positive_int, default=None, help="batches averaged for the gradient norms"
    )
    args = parse_args(parser, argv)
    q = args.quick
    layers = args.layers or (3 if q else 8)
    d_model = args.d_model or (64 if q else 128)
    steps = args.steps or (15 if q else 300)
    batch_size = args.batch_size or (8 if q else 16)
    n_grad_batches = args.grad_batches or (2 if q else 8)
    context, vocab = (32, 512) if q else (128, 2048)

    text = load_corpus()
    tokenizer = get_tokenizer(vocab, text=text)
    data = TokenData.from_text(text, tokenizer, context_length=context)
    # the 2017 recipe: LayerNorm, learned positions, GELU; only norm_placement differs
    try:
        base = DecoderConfig(
            vocab_size=vocab,
            context_length=context,
            n_layer=layers,
            d_model=d_model,
            n_head=4,
            n_kv_head=4,
            norm="layernorm",
            pos="learned",
            ffn="gelu",
            bias=True,
        )
    except ValueError as e:
        parser.error(f"--d-model {d_model}: {e}")
    checks_done(args)
    print(
        f"two {layers}-layer decoders, {args.init} initialisation, d_model {d_model}, "
        f"on {len(data.train):,} training tokens "
        f"({args.device_reason})"
    )

    g = torch.Generator().manual_seed(args.seed)
    grad_batches = [data.get_batch("train", batch_size, generator=g) for _ in range(n_grad_batches)]
    models, grad_norms, curves, figures = {}, {}, {}, {}
    for placement in ("post", "pre"):
        torch.manual_seed(args.seed)  # identical initial weights for both
        models[placement] = DecoderLM(base.replace(norm_placement=placement))
        if args.init == "2017":
            init_like_2017(models[placement])
        grad_norms[f"{placement}-LN"] = layer_grad_norms(models[placement], grad_batches)

    print(
        "\ngradient norm of each layer at initialisation (mean of "
        f"{n_grad_batches} batches)\n  layer   post-LN     pre-LN"
    )
    for i, (a, b) in enumerate(zip(grad_norms["post-LN"], grad_norms["pre-LN"]), start=1):
        print(f"  {i:>5}   {a:.3e}   {b:.3e}")
    for name, norms in grad_norms.items():
        key = name.replace("-", "").lower()
        figures[f"{key}_grad_last_over_first"] = norms[-1] / norms[0]
        print(f"{name}: last layer / first layer = {norms[-1] / norms[0]:.2f}")

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=args.lr,
        use_muon=False,
        warmup_steps=0,
        warmdown_frac=0.0,
        grad_clip=0.0,
        eval_every=0,
        eval_batches=4 if q else 16,
        seed=args.seed,
        dtype=args.dtype,
    )
    print(f"\ntraining both for {steps} steps, AdamW lr {args.lr:g} from the first step, no clipping")
    for placement, model in models.items():
        name = f"{placement}-LN"
        result = train(model, data, cfg, device=args.device)
        curves[name] = result["losses"]
        key = name.replace("-", "").lower()
        tail = result["losses"][-max(1, steps // 10) :]
        diverged = not all(math.isfinite(v) for v in result["losses"]) or len(result["losses"]) < steps
        figures[f"{key}_final_train_loss"] = sum(tail) / len(tail)
        figures[f"{key}_val_loss"] = result["val_loss"]
        figures[f"{key}_diverged"] = diverged
        print(
            f"{name}: mean train loss over the last {len(tail)} steps {sum(tail) / len(tail):.4f}, "
            f"val loss {result['val_loss']:.4f}{'  (DIVERGED)' if diverged else ''}"
        )

    gap = figures["postln_val_loss"] - figures["preln_val_loss"]
    figures["val_loss_gap_post_minus_pre"] = gap
    print(
        f"\nPost-LN ends {abs(gap):.3f} nats per token {'above' if gap > 0 else 'below'} Pre-LN "
        "on validation after the same steps"
    )
    png = os.path.join(args.out, "post_vs_pre_ln.png")
    plot(png, grad_norms, curves, args.lr)
    print(f"plot: {png}")
    return figures


if __name__ == "__main__":
    run_script(main)
