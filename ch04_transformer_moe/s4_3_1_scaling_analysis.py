"""Section 4.3.1: scaling analysis: what a model's size costs, and how loss falls with size.

Part 1, the table: parameters (total, and active per token for MoE; by part: embedding, attention,
MLP, norms), forward FLOPs per token and fp16 weight memory of GPT-2 small..XL, Llama-2 7B/13B/70B,
Mixtral 8x7B, DeepSeek-V3 and this project's decoder presets, from :func:`common.estimate.count_params`
and :func:`common.estimate.flops_per_token`. Every row's total is checked against the model itself,
built from the same config on PyTorch's meta device (shapes without memory, nothing downloaded):
transformers' model for the published architectures, our :class:`~common.models.decoder.DecoderLM` for
the presets. ``--models`` takes preset names or local ``config.json`` paths.

Part 2, a scaling ladder: decoder LMs of 4-5 sizes trained on the embedded corpus for the same number
of tokens, their validation loss against their non-embedding parameter count N (Kaplan et al.'s
convention), and a fit of ``L(N) = E + A·N^-α`` (scipy) on a log-log plot. Its exponent is printed
beside Kaplan et al. (2020)'s α_N ≈ 0.076 and Hoffmann et al. (2022)'s α ≈ 0.34. This is a teaching
ladder: a few minutes of CPU, models of thousands to a few million parameters, one seed, one token
budget; its exponent says how this ladder behaved, not what a large-scale law is. Quick mode trains
two sizes and fits nothing.

    python -m ch04_transformer_moe.s4_3_1_scaling_analysis
    python -m ch04_transformer_moe.s4_3_1_scaling_analysis --models llama-2-7b path/to/config.json
    python -m ch04_transformer_moe.s4_3_1_scaling_analysis --quick

A reader sees the table (DeepSeek-V3: 671.0B total, about 37B active), "meta-device check: N of N rows
exact", the ladder's losses, the fitted E, A, α beside the published exponents, and two PNGs.
"""

from __future__ import annotations

import math
import os

import torch

from common.estimate import PRESETS, count_params, flops_per_token, model_shape, preset_config
from common.models.decoder import PRESETS as DECODER_PRESETS
from common.models.decoder import DecoderConfig, DecoderLM
from common.plotting import pyplot, save_figure
from common.runner import (
    add_dtype_flag,
    checks_done,
    int_between,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
)

PUBLISHED = [
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "mixtral-8x7b",
    "deepseek-v3",
]
KAPLAN_ALPHA_N, HOFFMANN_ALPHA = 0.076, 0.34
# the ladder: (layers, width); 4 heads of width/4, SwiGLU, the "tiny" model's vocabulary
LADDER = [(2, 32), (2, 64), (3, 96), (4, 128), (4, 192)]
QUICK_LADDER = [(2, 32), (2, 64)]
FLOPS_SEQ = 2048  # FLOPs per token are given for a token attending to this many keys (or the context)


def _config(name: str):
    """(config, label) for a published preset, a DecoderConfig preset ("decoder-small") or a config path."""
    if name.startswith("decoder-") and name.removeprefix("decoder-") in DECODER_PRESETS:
        return DecoderConfig.preset(
            name.removeprefix("decoder-"), vocab_size=32000, context_length=2048
        ), name
    if name in PRESETS:
        return preset_config(name), name
    if not os.path.exists(name):
        choices = ", ".join([*PRESETS, *(f"decoder-{p}" for p in DECODER_PRESETS)])
        raise ValueError(f"unknown model {name!r}: not a preset ({choices}) nor a config.json path")
    from common.estimate import load_config

    return load_config(name), os.path.basename(os.path.dirname(os.path.abspath(name))) or name


def meta_count(config) -> int:
    """sum(p.numel()) of the model built from ``config`` on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        if isinstance(config, DecoderConfig):
            model = DecoderLM(config)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def table(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        config, label = _config(name)
        p = count_params(config)
        seq = min(FLOPS_SEQ, model_shape(config).context_length)
        meta = meta_count(config)
        rows.append(
            {
                "name": label,
                **p,
                "flops": flops_per_token(config, seq),
                "seq": seq,
                "fp16_gb": 2 * p["total"] / 1e9,
                "meta": meta,
                "exact": meta == p["total"],
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    def b(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    print(
        f"{'model':<16} {'total':>9} {'active':>9} {'embed':>8} {'attention':>9} {'mlp':>9} {'norm':>8} "
        f"{'GFLOPs/tok':>10} {'fp16 GB':>8}  meta-device"
    )
    for r in rows:
        check = "exact" if r["exact"] else f"DIFFERS: {r['meta']:,}"
        print(
            f"{r['name']:<16} {b(r['total']):>9} {b(r['active']):>9} {b(r['embedding'] + r['lm_head']):>8} "
            f"{b(r['attention']):>9} {b(r['mlp']):>9} {r['norm']:>8,} {r['flops'] / 1e9:>10.2f} "
            f"{r['fp16_gb']:>8.2f}  {check}"
        )


def plot_table(path: str, rows: list[dict]) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["total"] for r in rows], width=0.4, label="total")
    ax.bar([x + 0.2 for x in xs], [r["active"] for r in rows], width=0.4, label="active per token")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set(yscale="log", ylabel="parameters", title="Parameters: total and active per token")
    ax.legend()
    save_figure(fig, path)


def train_ladder(sizes, tokens: int, seed: int, device: str, dtype: str = "fp32") -> list[dict]:
    """Train each (layers, width) on the corpus for ``tokens`` training tokens; validation loss per size."""
    from common.data import TokenData, get_tokenizer, load_corpus
    from common.pretrained import SPECS
    from common.training import TrainConfig, train

    vocab, context, batch = SPECS["tiny"]["vocab_size"], 64, 16
    text = load_corpus()
    data = TokenData.from_text(text, get_tokenizer(vocab, text=text), context_length=context)
    steps = max(1, tokens // (batch * context))
    rows = []
    for layers, width in sizes:
        torch.manual_seed(seed)
        config = DecoderConfig(
            vocab_size=vocab, context_length=context, n_layer=layers, d_model=width, n_head=4, n_kv_head=4
        )
        model = DecoderLM(config)
        n = count_params(config)["non_embedding"]
        if n != model.num_params(non_embedding=True):
            raise AssertionError(f"count_params disagrees with the model for {layers}x{width}")
        cfg = TrainConfig(
            steps=steps,
            batch_size=batch,
            warmup_steps=min(10, steps // 4),
            warmdown_frac=0.4,
            lr=4e-3,
            muon_lr=0.02,
            eval_every=0,
            eval_batches=16,
            seed=seed,
            dtype=dtype,
            progress=True,
        )
        result = train(model, data, cfg, device=device)
        rows.append(
            {
                "layers": layers,
                "width": width,
                "n": n,
                "loss": result["val_loss"],
                "seconds": result["seconds"],
            }
        )
        print(
            f"   {layers} layers x {width:>3}: N = {n:>9,} non-embedding, val loss {result['val_loss']:.4f} "
            f"({result['seconds']:.0f} s)"
        )
    return rows


def fit_power_law(ns, losses) -> tuple[float, float, float]:
    """(E, A, α) of ``L = E + A·N^-α`` by least squares (scipy.optimize.curve_fit)."""
    import numpy as np
    from scipy.optimize import curve_fit

    n = np.asarray(ns, dtype=float)
    y = np.asarray(losses, dtype=float)

    def law(x, e, a, alpha):
        return e + a * np.power(x, -alpha)

    (e, a, alpha), _ = curve_fit(
        law,
        n,
        y,
        p0=(max(y.min() - 1.0, 0.0), 10.0, 0.3),
        bounds=([0.0, 0.0, 0.0], [y.min(), np.inf, 3.0]),
        maxfev=20000,
    )
    return float(e), float(a), float(alpha)


def plot_ladder(path: str, rows: list[dict], fit) -> None:
    import numpy as np

    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    ax.plot([r["n"] for r in rows], [r["loss"] for r in rows], "o", label="trained")
    if fit is not None:
        e, a, alpha = fit
        xs = np.geomspace(rows[0]["n"] / 1.5, rows[-1]["n"] * 1.5, 50)
        ax.plot(xs, e + a * xs**-alpha, "-", label=f"E + A·N^-α, α = {alpha:.3f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="non-embedding parameters N",
        ylabel="validation loss",
        title="Loss against size at a fixed token budget",
    )
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--models",
        nargs="+",
        metavar="NAME_OR_PATH",
        default=None,
        help="presets ("
        + ", ".join([*PRESETS, *(f"decoder-{p}" for p in DECODER_PRESETS)])
        + ") or paths to config.json; default: all",
    )
    parser.add_argument(
        "--tokens",
        type=int_between(1024, 1 << 30),  # at least one batch
        default=None,
        help="training tokens per ladder model (default 300000; quick: 10000)",
    )
    parser.add_argument("--no-ladder", action="store_true", help="only the table")
    args = parse_args(parser, argv)
    names = args.models or [*PUBLISHED, *(f"decoder-{p}" for p in DECODER_PRESETS)]
    for name in names:
        try:
            model_shape(_config(name)[0])
        except ValueError as e:
            parser.error(f"--models {name}: {str(e).splitlines()[0]}")
    quick_or_full(args, tokens=(10_000, 300_000))
    tokens = args.tokens
    checks_done(args)

    print(
        f"1. parameters, FLOPs per token (a token attending to min({FLOPS_SEQ}, context) keys) and fp16 "
        f"weights\n"
    )
    rows = table(names)
    print_table(rows)
    print(
        "(decoder-*: this project's DecoderConfig presets with a 32,000-token vocabulary and 2,048 context)"
    )
    exact = sum(r["exact"] for r in rows)
    print(f"\nmeta-device check: {exact} of {len(rows)} rows exact")
    plot_table(os.path.join(args.out, "parameters.png"), rows)
    figures = {"rows_exact": exact, "rows": len(rows)}
    for r in rows:
        figures.update(
            {
                f"{r['name']}_total": r["total"],
                f"{r['name']}_active": r["active"],
                f"{r['name']}_gflops_per_token": r["flops"] / 1e9,
            }
        )
    if exact != len(rows):
        raise AssertionError("count_params differs from the meta-device model for some rows")
    if args.no_ladder:
        return figures

    sizes = QUICK_LADDER if args.quick else LADDER
    print(f"\n2. scaling ladder: {len(sizes)} sizes, {tokens:,} training tokens each")
    ladder = train_ladder(sizes, tokens, args.seed, args.device, args.dtype)
    figures.update({f"ladder_{r['layers']}x{r['width']}_n": r["n"] for r in ladder})
    figures.update({f"ladder_{r['layers']}x{r['width']}_loss": r["loss"] for r in ladder})
    fit = None
    if len(ladder) >= 4:
        fit = fit_power_law([r["n"] for r in ladder], [r["loss"] for r in ladder])
        e, a, alpha = fit
        print(
            f"\n   fit L(N) = E + A·N^-α: E = {e:.3f}, A = {a:.3g}, α = {alpha:.3f}   "
            f"(Kaplan et al. 2020: α_N ≈ {KAPLAN_ALPHA_N}; Hoffmann et al. 2022: α ≈ {HOFFMANN_ALPHA})"
        )
        print(
            "   a teaching ladder (one seed, one budget, small models): the fitted α describes it, not the "
            "laws measured on billions of tokens"
        )
        figures.update(
            {
                "fit_E": e,
                "fit_A": a,
                "fit_alpha": alpha,
                "kaplan_alpha_n": KAPLAN_ALPHA_N,
                "hoffmann_alpha": HOFFMANN_ALPHA,
            }
        )
    else:
        print("   (quick mode: two sizes, no fit)")
    plot_ladder(os.path.join(args.out, "scaling_ladder.png"), ladder, fit)
    if not math.isfinite(ladder[-1]["loss"]):
        raise AssertionError("a ladder model diverged")
    return figures


if __name__ == "__main__":
    run_script(main)
