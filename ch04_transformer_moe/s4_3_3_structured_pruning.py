"""Section 4.3.3: structured pruning: remove whole attention heads and feed-forward neurons.

Unstructured pruning zeroes single weights and leaves every matrix its shape; structured pruning takes
out whole rows and columns, so the model really is smaller and faster on any hardware. The units and
their scores come from :mod:`common.prune`:

- an attention head is its rows of the q/k/v projection and its columns of the output projection;
- a feed-forward neuron is its gate and up rows (SwiGLU) and its column of the down projection;
- *magnitude* scores rank them by the norm of those weights, *activation* scores by what they add to
  the residual stream on a few calibration batches of training text.

The script prunes the same fraction of heads and of neurons in every layer of the project's trained LM
(or ``--hf-path DIR``, a local Llama-architecture folder) at several ratios, with both scores, and shows
for each the parameter count, the measured latency of a forward pass and the validation loss and bits
per byte; then a short recovery fine-tune of the 50% model. It checks that the physically smaller
model gives the original model's logits with those heads and neurons zeroed (within 1e-5), and times one
feed-forward layer with half its neurons removed against the dense one.

    python -m ch04_transformer_moe.s4_3_3_structured_pruning
    python -m ch04_transformer_moe.s4_3_3_structured_pruning --ratios 0.25 0.5 --recover-steps 100
    python -m ch04_transformer_moe.s4_3_3_structured_pruning --quick

A reader sees a table (score, ratio, parameters, latency, loss, bpb), the pruned-vs-zeroed difference
(below 1e-5), the half-width MLP's latency ratio and the loss regained by the fine-tune, plus
``structured_pruning.png``.
"""

from __future__ import annotations

import os

import torch

from common.lm_source import add_source_args, evaluate_lm, load_decoder
from common.plotting import pyplot, save_figure
from common.prune import (
    activation_scores,
    head_scores,
    lowest_per_layer,
    n_head_units,
    neuron_scores,
    prune_model,
    zero_units,
)
from common.runner import (
    add_dtype_flag,
    checks_done,
    fraction,
    non_negative_int,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)
from common.timing import paired_ratio, race
from common.training import TrainConfig, train


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def plot(path: str, rows: list[dict], dense: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for method in ("magnitude", "activation"):
        pts = [r for r in rows if r["score"] == method]
        ax.plot([r["params"] / 1e6 for r in pts], [r["loss"] for r in pts], "o-", label=f"{method} score")
    ax.plot([dense["params"] / 1e6], [dense["loss"]], "k*", markersize=10, label="dense")
    ax.set(
        xlabel="parameters (millions)",
        ylabel="validation loss (nats/token)",
        title="Structured pruning: heads and neurons removed",
    )
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    add_source_args(parser)
    parser.add_argument(
        "--ratios",
        type=fraction,
        nargs="+",
        default=None,
        help="fractions of heads and of neurons removed from every layer (default 0.25 0.5 0.75; "
        "quick: 0.25 0.5)",
    )
    parser.add_argument(
        "--recover-steps",
        type=non_negative_int,
        default=None,
        help="fine-tune steps after pruning 50%% (default 60, quick: 5; 0: none)",
    )
    parser.add_argument(
        "--eval-batches",
        type=positive_int,
        default=None,
        help="validation batches of 8 (default 16, quick: 4)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timing rounds (default 20, quick: 5)"
    )
    args = parse_args(parser, argv)
    quick_or_full(args, ratios=([0.25, 0.5], [0.25, 0.5, 0.75]), eval_batches=(4, 16), repeats=(5, 20))
    quick_or_full(args, recover_steps=(5, 60))
    eval_batches, repeats, recover_steps = args.eval_batches, args.repeats, args.recover_steps
    source, model = load_decoder(parser, args, "structured pruning")
    units = [n_head_units(b.attn) for b in model.blocks]
    for r in args.ratios:
        if any(round(r * u) >= u for u in units):
            parser.error(
                f"--ratios {r}: removing {round(r * min(units))} of {min(units)} heads leaves no heads"
            )
        neurons = model.config.ffn_dim
        if round(r * neurons) >= neurons:
            parser.error(f"--ratios {r}: removing {round(r * neurons)} of {neurons} neurons leaves none")
    checks_done(args)
    device = next(model.parameters()).device
    print(f"model: {source.describe()}")

    ctx = model.config.context_length
    timing_x = torch.randint(0, model.config.vocab_size, (8, ctx), device=device)
    calib = [
        source.data.get_batch("train", 8, torch.Generator().manual_seed(args.seed + i))[0] for i in range(4)
    ]

    def measure(m) -> dict:
        return {**evaluate_lm(m, source.data, 8, eval_batches), "params": n_params(m)}

    dense = measure(model)
    print(f"dense: {dense['params']:,} parameters, val loss {dense['loss']:.4f}, bpb {dense['bpb']:.4f}")
    scores = {
        "magnitude": (head_scores(model), neuron_scores(model)),
        "activation": activation_scores(model, calib),
    }

    # 1. the proof: the smaller model computes what the zeroed one does
    heads_sc, neurons_sc = scores["magnitude"]
    heads, neurons = lowest_per_layer(heads_sc, 0.5), lowest_per_layer(neurons_sc, 0.5)
    small, zeroed = prune_model(model, heads, neurons), zero_units(model, heads, neurons)
    with torch.inference_mode():
        diff = (small(timing_x)[0] - zeroed(timing_x)[0]).abs().max().item()
    print(
        f"\n1. 50% of heads and neurons removed: {n_params(small):,} parameters; max |logits - logits of "
        f"the zeroed model| = {diff:.2e}"
    )
    if diff > 1e-5:
        raise AssertionError(f"the pruned model differs from the zeroed one by {diff:.2e}")

    # 2. one feed-forward layer at half width against the dense one
    dense_ffn, half_ffn = model.blocks[0].ffn, small.blocks[0].ffn
    h = torch.randn(8, ctx, model.config.d_model, device=device)

    def run(ffn):
        def fn():
            with torch.inference_mode():
                ffn(h)

        return fn

    times = race({"half": run(half_ffn), "dense": run(dense_ffn)}, repeats * 5, device=device.type)
    mlp_ratio = paired_ratio(times["half"], times["dense"])
    print(
        f"\n2. feed-forward of layer 0 on {8 * ctx} tokens: 50% of neurons removed takes {mlp_ratio:.2f}x "
        f"the dense time ({repeats * 5} alternating rounds)"
    )

    # 3. the sweep
    print(f"\n3. sweep (latency: one forward pass over (8, {ctx}) tokens, relative to the dense model)")
    print(f"   {'score':<11} {'ratio':>5} {'parameters':>11} {'latency':>8} {'val loss':>9} {'bpb':>7}")
    rows = []
    for method, (hs, ns) in scores.items():
        for r in args.ratios:
            pruned = prune_model(model, lowest_per_layer(hs, r), lowest_per_layer(ns, r))

            def fwd(m):
                def fn():
                    with torch.inference_mode():
                        m(timing_x)

                return fn

            t = race({"pruned": fwd(pruned), "dense": fwd(model)}, repeats, device=device.type)
            row = {
                "score": method,
                "ratio": r,
                **measure(pruned),
                "latency": paired_ratio(t["pruned"], t["dense"]),
            }
            rows.append(row)
            print(
                f"   {method:<11} {r:>5.2f} {row['params']:>11,} {row['latency']:>7.2f}x {row['loss']:>9.4f} "
                f"{row['bpb']:>7.4f}"
            )
    plot(os.path.join(args.out, "structured_pruning.png"), rows, dense)

    figures = {
        "model": source.name,
        "dense_params": dense["params"],
        "dense_val_loss": dense["loss"],
        "dense_val_bpb": dense["bpb"],
        "pruned_vs_zeroed_max_abs_diff": diff,
        "mlp_half_over_dense_latency": mlp_ratio,
    }
    for row in rows:
        key = f"{row['score']}_{round(100 * row['ratio'])}"
        figures.update(
            {
                f"{key}_params": row["params"],
                f"{key}_val_loss": row["loss"],
                f"{key}_latency_ratio": row["latency"],
            }
        )

    # 4. a short recovery fine-tune of the 50% model
    if recover_steps:
        pruned = prune_model(
            model,
            lowest_per_layer(scores["activation"][0], 0.5),
            lowest_per_layer(scores["activation"][1], 0.5),
        )
        before = evaluate_lm(pruned, source.data, 8, eval_batches)["loss"]
        cfg = TrainConfig(
            steps=recover_steps,
            batch_size=8,
            lr=1e-3,
            muon_lr=0.005,
            warmup_steps=0,
            eval_every=0,
            eval_batches=eval_batches,
            seed=args.seed,
            dtype=args.dtype,
            progress=True,
        )
        train(pruned, source.data, cfg, device=str(device))
        after = evaluate_lm(pruned, source.data, 8, eval_batches)["loss"]
        print(
            f"\n4. recovery: 50% pruned (activation score), {recover_steps} fine-tune steps: val loss "
            f"{before:.4f} -> {after:.4f} (dense {dense['loss']:.4f})"
        )
        figures.update(
            {"recover_steps": recover_steps, "recover_loss_before": before, "recover_loss_after": after}
        )
    return figures


if __name__ == "__main__":
    run_script(main)
