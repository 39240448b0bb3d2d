"""Section 4.1.4: training a decoder-only language model end to end, two recipes side by side.

Trains :class:`common.models.decoder.DecoderLM` on the embedded corpus (Python's own reference
manual and standard-library docstrings, :func:`common.data.load_corpus`) with the loop of
:mod:`common.training`: gradient accumulation, clipping, bf16 autocast on GPUs that support it,
validation loss and bits per byte, checkpoints every N steps and on Ctrl-C, and ``--resume``.

Two recipes (``--recipe``), at the same parameter count, steps and data order:

- ``llama``: SwiGLU, RMSNorm with a weight, AdamW for every parameter, linear warm-up then cosine
  decay (Llama's recipe, and the reader project's schedule);
- ``nanodeepseek`` (the book's reader project): ReLU² feed-forward (width 3/2 of SwiGLU's, so the
  same parameters), parameter-free RMSNorm, QK-norm; Muon for the hidden matrices and AdamW with a
  learning rate of its own for the embedding and for the unembedding (output head), linear warm-up
  and warm-down.  It has no norm weights at all, so it is smaller by exactly those.

    python -m ch04_transformer_moe.s4_1_4_train_lm                     # both recipes, tiny, a few minutes
    python -m ch04_transformer_moe.s4_1_4_train_lm --quick             # seconds: a smoke run
    python -m ch04_transformer_moe.s4_1_4_train_lm --recipe nanodeepseek --steps 400
    python -m ch04_transformer_moe.s4_1_4_train_lm --preset small --device cuda --steps 2000
    python -m ch04_transformer_moe.s4_1_4_train_lm --resume            # continue from runs/.../checkpoint
    torchrun --nproc_per_node 2 -m ch04_transformer_moe.s4_1_4_train_lm  # data parallel (gloo on CPU)

``--preset`` picks the book's sizes (small 6x384, base 12x768, large 24x1536, from
``DecoderConfig.preset``) or ``tiny`` (4x128, the CPU default, the same model ``common.pretrained``
caches).  The reader project calls its presets "≈8M, ≈35M, ≈150M" parameters; the script prints
the real counts of both recipes' presets beside them (see ERRATA.md).  A reader sees the preset
table, each recipe's model and data sizes, a progress bar with the loss, periodic validation lines,
the final validation loss and bits per byte of each, a few generated continuations, and
``loss.png`` (both recipes' curves) in the output folder.
"""

from __future__ import annotations

import os

import torch

from common.data import TokenData, get_tokenizer, load_corpus
from common.errors import UsageError
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
    unit_float,
)
from common.training import (
    TrainConfig,
    cleanup_distributed,
    finished_run,
    resume_plan,
    setup_distributed,
    train,
)

TINY = dict(n_layer=4, d_model=128, n_head=4, n_kv_head=4)
QUICK = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=2)
PROMPTS = ['The "if" statement', "A dictionary is", "Return the number of"]
RECIPES = ("llama", "nanodeepseek")
BOOK_PRESET_PARAMS = {"small": "≈8M", "base": "≈35M", "large": "≈150M"}  # the reader project's words


def recipe_config(recipe: str, config):
    """The architecture of ``recipe`` on ``config``'s sizes (a Llama-style DecoderConfig)."""
    if recipe == "llama":
        return config.replace(ffn="swiglu", norm="rmsnorm", qk_norm=False)
    # ReLU² has two matrices to SwiGLU's three: 3/2 of SwiGLU's width gives the same parameters
    return config.replace(ffn="relu2", d_ff=3 * config.ffn_dim // 2, norm="rmsnorm_noweight", qk_norm=True)


def recipe_optimizer(recipe: str, args) -> dict:
    """The TrainConfig fields that make ``recipe``'s optimizer and schedule."""
    if recipe == "llama":
        return dict(use_muon=False, lr=args.lr, schedule="cosine", final_lr_ratio=0.1)
    return dict(
        use_muon=True,
        lr=args.lr,
        muon_lr=args.muon_lr,
        embedding_lr=args.embedding_lr,
        head_lr=args.head_lr,
        schedule="linear",
        warmdown_frac=args.warmdown_frac,
    )


def preset_table(vocab: int) -> dict:
    """Print the presets' real parameter counts (both recipes) beside the reader project's."""
    from common.models.decoder import PRESETS, DecoderConfig, DecoderLM

    figures = {}
    print(f"presets, real parameter counts (vocabulary {vocab}) beside the reader project's")
    print(f"  {'preset':<7}{'book':>7}{'llama':>14}{'nanodeepseek':>14}{'its non-embedding':>19}")
    for name in PRESETS:
        counts = {}
        for recipe in RECIPES:
            with torch.device("meta"):
                model = DecoderLM(recipe_config(recipe, DecoderConfig.preset(name, vocab_size=vocab)))
            counts[recipe] = model.num_params()
            figures[f"preset_{name}_{recipe}_params"] = counts[recipe]
        non_emb = model.num_params(non_embedding=True)
        figures[f"preset_{name}_non_embedding_params"] = non_emb
        print(
            f"  {name:<7}{BOOK_PRESET_PARAMS[name]:>7}{counts['llama']:>14,}{counts['nanodeepseek']:>14,}"
            f"{non_emb:>19,}"
        )
    print(
        "  the book's figures are below even the non-embedding counts, which no vocabulary changes "
        "(see ERRATA.md)\n"
    )
    return figures


def plot_losses(path: str, results: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for recipe, result in results.items():
        line = ax.plot(
            range(1, len(result["losses"]) + 1), result["losses"], alpha=0.4, label=f"{recipe} train"
        )
        if result["val"]:
            ax.plot(
                [v["step"] for v in result["val"]],
                [v["loss"] for v in result["val"]],
                "o-",
                color=line[0].get_color(),
                label=f"{recipe} validation",
            )
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title="Decoder LM on the embedded corpus")
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    from common.models.decoder import DecoderConfig, DecoderLM
    from common.models.generation import decode_room_problem, generate

    parser = script_parser(__doc__)
    parser.add_argument(
        "--preset",
        choices=["tiny", "small", "base", "large"],
        default="tiny",
        help="model size: tiny (CPU default) or one of DecoderConfig.preset's",
    )
    parser.add_argument(
        "--corpus", default=None, help="train on this UTF-8 text file instead of the embedded corpus"
    )
    parser.add_argument(
        "--vocab-size",
        type=int_between(257, 65536),  # the 256 bytes and <|endoftext|>, up to 16-bit ids
        default=None,
        help="BPE vocabulary (default 2048; quick 512)",
    )
    parser.add_argument(
        "--context", type=count_int, default=None, help="context length in tokens (default 128; quick 64)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimizer steps (default 160; quick 12)"
    )
    parser.add_argument(
        "--batch-size",
        type=count_int,
        default=None,
        help="sequences per micro-batch per process (default 16; quick 8)",
    )
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches accumulated per optimizer step"
    )
    parser.add_argument(
        "--recipe", choices=[*RECIPES, "both"], default="both", help="which recipe(s) to train (default both)"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=4e-3,
        help="AdamW learning rate (llama: every parameter; nanodeepseek: "
        "what is neither a matrix, the embedding nor the head)",
    )
    parser.add_argument(
        "--muon-lr", type=positive_float, default=0.02, help="nanodeepseek: Muon's rate (matrices)"
    )
    parser.add_argument(
        "--embedding-lr", type=positive_float, default=0.02, help="nanodeepseek: AdamW rate of the embedding"
    )
    parser.add_argument(
        "--head-lr",
        type=positive_float,
        default=0.004,
        help="nanodeepseek: AdamW rate of the unembedding (head)",
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=None, help="warm-up steps (default 10; quick 3)"
    )
    parser.add_argument(
        "--warmdown-frac",
        type=unit_float,
        default=0.4,
        help="nanodeepseek: share of steps in the final decay",
    )
    parser.add_argument(
        "--grad-clip", type=non_negative_float, default=1.0, help="clip the global gradient norm (0: off)"
    )
    parser.add_argument(
        "--eval-every",
        type=non_negative_int,
        default=None,
        help="validate every N steps (default 40; quick 6)",
    )
    parser.add_argument(
        "--ckpt-every",
        type=non_negative_int,
        default=None,
        help="checkpoint every N steps (default 50; quick 6)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in the output folder: a recipe with one continues, one that "
        "never began starts, a finished one is kept",
    )
    add_dtype_flag(parser, fp16=True)
    parser.add_argument(
        "--samples",
        type=int_between(0, len(PROMPTS)),
        default=3,
        help="continuations to generate at the end, one per prompt",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=40, help="tokens per generated continuation"
    )
    args = parse_args(parser, argv)
    q = args.quick
    quick_or_full(args, warmup=(3, 10))
    dist = setup_distributed(args.device)
    say = print if dist.is_main else (lambda *a, **k: None)
    recipes = RECIPES if args.recipe == "both" else (args.recipe,)

    vocab = args.vocab_size or (512 if q else 2048)
    context = args.context or (64 if q else 128)
    figures = preset_table(vocab) if dist.is_main else {}
    text = load_corpus(args.corpus)
    tokenizer = get_tokenizer(vocab, text=text)
    data = TokenData.from_text(text, tokenizer, context_length=context)
    if args.preset == "tiny":
        base = DecoderConfig(vocab_size=vocab, context_length=context, **(QUICK if q else TINY))
    else:
        base = DecoderConfig.preset(args.preset, vocab_size=vocab, context_length=context)
    say(
        f"data: {len(data.train):,} training / {len(data.val):,} validation tokens, "
        f"{data.bytes_per_token['val']:.2f} bytes per token, vocabulary {vocab}"
    )
    results, models, runs = {}, {}, {}
    try:
        for recipe in recipes:  # every recipe's model and settings, and what --resume does with it
            config = recipe_config(recipe, base)
            torch.manual_seed(args.seed)  # every rank starts from the same weights
            model = models[recipe] = DecoderLM(config)
            cfg = TrainConfig(
                steps=args.steps or (12 if q else 160),
                batch_size=args.batch_size or (8 if q else 16),
                grad_accum=args.grad_accum,
                warmup_steps=args.warmup,
                grad_clip=args.grad_clip,
                eval_every=(6 if q else 40) if args.eval_every is None else args.eval_every,
                eval_batches=4 if q else 16,
                ckpt_dir=os.path.join(args.out, f"checkpoint-{recipe}"),
                ckpt_every=(6 if q else 50) if args.ckpt_every is None else args.ckpt_every,
                resume=args.resume,
                seed=args.seed,
                dtype=args.dtype,
                **recipe_optimizer(recipe, args),
            )
            runs[recipe] = (cfg, resume_plan(model, cfg) if args.resume else "start")
        if args.resume and all(plan == "start" for _, plan in runs.values()):
            raise UsageError(f"resume: no checkpoint of any recipe in {args.out} to resume from")
        prompts = [tokenizer.encode(p).ids for p in PROMPTS[: args.samples]]
        problem = decode_room_problem(prompts, args.max_new_tokens, context)
        if problem:
            raise UsageError(f"--max-new-tokens {args.max_new_tokens}: {problem} (--context)")
        checks_done(args)
        for recipe, (cfg, plan) in runs.items():
            model, config = models[recipe], models[recipe].config
            cfg.resume = plan == "resume"  # a recipe that never began starts; a finished one is kept
            tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size * context
            rates = (
                f"AdamW {cfg.lr:g}, cosine"
                if recipe == "llama"
                else f"Muon {cfg.muon_lr:g} (matrices), AdamW {cfg.embedding_lr:g} (embedding) / "
                f"{cfg.head_lr:g} (head), warm-down {cfg.warmdown_frac:g}"
            )
            say(
                f"\n{recipe}: {args.preset}{' (quick)' if q and args.preset == 'tiny' else ''}, "
                f"{config.n_layer} layers x {config.d_model}, {config.ffn} width {config.ffn_dim}, "
                f"{config.norm}{', QK-norm' if config.qk_norm else ''}: {model.num_params():,} parameters "
                f"({model.num_params(non_embedding=True):,} without embeddings)"
            )
            say(
                f"run: {cfg.steps} steps x {tokens_per_step:,} tokens ({cfg.batch_size} x {cfg.grad_accum} "
                f"accumulation x {dist.world_size} process{'es' if dist.world_size > 1 else ''} x "
                f"{context}), "
                f"{rates}, device {dist.device} ({args.device_reason})"
            )
            if plan == "done":
                result = results[recipe] = finished_run(model, cfg, device=dist.device)
                say(f"finished earlier (the checkpoint {cfg.ckpt_dir} is its last step): kept, not retrained")
            else:
                result = results[recipe] = train(model, data, cfg, device=dist.device)
            if plan == "resume":
                say(f"resumed from step {result['resumed_from']}")
            say(
                f"{recipe}: validation loss {result['val_loss']:.4f} nats per token, "
                f"{result['val_bpb']:.4f} bits per byte; {result['tokens_per_second']:,.0f} tokens/s "
                f"over {result['seconds']:.1f} s"
            )
            figures.update(
                {
                    f"{recipe}_params": model.num_params(),
                    f"{recipe}_val_loss": result["val_loss"],
                    f"{recipe}_val_bpb": result["val_bpb"],
                    f"{recipe}_final_train_loss": result["losses"][-1],
                    f"{recipe}_tokens_per_second": result["tokens_per_second"],
                    f"{recipe}_train_seconds": result["seconds"],
                }
            )
    finally:
        cleanup_distributed()
    if not dist.is_main:
        return {}
    say(f"\n(a uniform guess: {torch.log(torch.tensor(float(vocab))).item():.2f} nats per token)")
    if len(results) == 2:
        a, b = results["llama"], results["nanodeepseek"]
        say(
            f"llama {a['val_loss']:.4f} vs nanodeepseek {b['val_loss']:.4f} nats per token "
            f"({a['val_bpb']:.4f} vs {b['val_bpb']:.4f} bits per byte: "
            f"{'nanodeepseek' if b['val_loss'] < a['val_loss'] else 'llama'} lower) after {a['steps']} "
            f"steps each, {figures['llama_params']:,} vs {figures['nanodeepseek_params']:,} parameters"
        )

    if prompts:  # --samples 0 generates nothing
        for recipe, model in models.items():
            model.eval()
            g = torch.Generator(device=dist.device).manual_seed(args.seed)
            continuations = generate(
                model,
                prompts,
                args.max_new_tokens,
                temperature=0.8,
                top_k=50,
                generator=g,
                stop_tokens=tokenizer.token_to_id("<|endoftext|>"),
            )
            say(f"\n{recipe} samples (temperature 0.8, top-k 50):")
            for prompt, ids in zip(PROMPTS, continuations):
                say(f"  {prompt!r} -> {tokenizer.decode(ids)!r}")
    png = os.path.join(args.out, "loss.png")
    plot_losses(png, results)
    say(f"\nplot: {png}; checkpoints: {os.path.join(args.out, 'checkpoint-<recipe>')}")
    return {
        "preset": args.preset,
        "steps": next(iter(results.values()))["steps"],
        "bytes_per_token": data.bytes_per_token["val"],
        "world_size": dist.world_size,
        **figures,
    }


if __name__ == "__main__":
    run_script(main)
