"""Section 4.1.4: training a decoder-only language model end to end.

Trains :class:`common.models.decoder.DecoderLM` on the embedded corpus (Python's own reference
manual and standard-library docstrings, :func:`common.data.load_corpus`) with the loop of
:mod:`common.training`: Muon for the hidden matrices and AdamW for embeddings, head and norms,
linear warm-up and warm-down, gradient accumulation, clipping, bf16 autocast on GPUs that support
it, validation loss and bits per byte, checkpoints every N steps and on Ctrl-C, and ``--resume``.

    python -m ch04_transformer_moe.s4_1_4_train_lm                     # tiny model, CPU, a few minutes
    python -m ch04_transformer_moe.s4_1_4_train_lm --quick             # seconds: a smoke run
    python -m ch04_transformer_moe.s4_1_4_train_lm --preset small --device cuda --steps 2000
    python -m ch04_transformer_moe.s4_1_4_train_lm --resume            # continue from runs/.../checkpoint
    torchrun --nproc_per_node 2 -m ch04_transformer_moe.s4_1_4_train_lm  # data parallel (gloo on CPU)

``--preset`` picks the book's sizes (small 6x384, base 12x768, large 24x1536, from
``DecoderConfig.preset``) or ``tiny`` (4x128, the CPU default, the same model ``common.pretrained``
caches).  A reader sees the model and data sizes, a progress bar with the loss, periodic validation
lines, the final validation loss and bits per byte, a few generated continuations, and ``loss.png``
in the output folder.
"""

from __future__ import annotations

import os

import torch

from common.data import TokenData, get_tokenizer, load_corpus
from common.plotting import pyplot, save_figure
from common.runner import non_negative_int, parse_args, positive_int, run_script, script_parser
from common.training import TrainConfig, cleanup_distributed, setup_distributed, train

TINY = dict(n_layer=4, d_model=128, n_head=4, n_kv_head=4)
QUICK = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=2)
PROMPTS = ['The "if" statement', "A dictionary is", "Return the number of"]


def plot_losses(path: str, result: dict) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(range(1, len(result["losses"]) + 1), result["losses"], label="train (per step)")
    if result["val"]:
        ax.plot(
            [v["step"] for v in result["val"]], [v["loss"] for v in result["val"]], "o-", label="validation"
        )
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title="Decoder LM on the embedded corpus")
    ax.legend()
    save_figure(fig, path)


def main(argv=None) -> dict:
    from common.models.decoder import DecoderConfig, DecoderLM
    from common.models.generation import generate

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
        "--vocab-size", type=positive_int, default=None, help="BPE vocabulary (default 2048; quick 512)"
    )
    parser.add_argument(
        "--context", type=positive_int, default=None, help="context length in tokens (default 128; quick 64)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="optimizer steps (default 160; quick 12)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="sequences per micro-batch per process (default 32; quick 8)",
    )
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="micro-batches accumulated per optimizer step"
    )
    parser.add_argument(
        "--lr", type=float, default=4e-3, help="AdamW learning rate (embeddings, head, norms)"
    )
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon learning rate (hidden matrices)")
    parser.add_argument("--no-muon", action="store_true", help="AdamW for every parameter")
    parser.add_argument("--warmup", type=non_negative_int, default=10, help="warm-up steps")
    parser.add_argument("--warmdown-frac", type=float, default=0.4, help="share of steps in the final decay")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
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
        "--resume", action="store_true", help="continue from the checkpoint in the output folder"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast dtype; auto = bf16 where the GPU supports it, else fp32",
    )
    parser.add_argument(
        "--samples", type=non_negative_int, default=3, help="continuations to generate at the end"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=40, help="tokens per generated continuation"
    )
    args = parse_args(parser, argv)
    q = args.quick
    dist = setup_distributed(args.device)
    say = print if dist.is_main else (lambda *a, **k: None)

    vocab = args.vocab_size or (512 if q else 2048)
    context = args.context or (64 if q else 128)
    text = load_corpus(args.corpus)
    tokenizer = get_tokenizer(vocab, text=text)
    data = TokenData.from_text(text, tokenizer, context_length=context)
    if args.preset == "tiny":
        config = DecoderConfig(vocab_size=vocab, context_length=context, **(QUICK if q else TINY))
    else:
        config = DecoderConfig.preset(args.preset, vocab_size=vocab, context_length=context)
    torch.manual_seed(args.seed)  # every rank starts from the same weights
    model = DecoderLM(config)
    cfg = TrainConfig(
        steps=args.steps or (12 if q else 160),
        batch_size=args.batch_size or (8 if q else 32),
        grad_accum=args.grad_accum,
        lr=args.lr,
        muon_lr=args.muon_lr,
        use_muon=not args.no_muon,
        warmup_steps=min(args.warmup, 3) if q else args.warmup,
        warmdown_frac=args.warmdown_frac,
        grad_clip=args.grad_clip,
        eval_every=(6 if q else 40) if args.eval_every is None else args.eval_every,
        eval_batches=4 if q else 16,
        ckpt_dir=os.path.join(args.out, "checkpoint"),
        ckpt_every=(6 if q else 50) if args.ckpt_every is None else args.ckpt_every,
        resume=args.resume,
        seed=args.seed,
        dtype=args.dtype,
    )
    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size * context
    say(
        f"model: {args.preset}{' (quick)' if q and args.preset == 'tiny' else ''}, {config.n_layer} layers x "
        f"{config.d_model}, {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} "
        "without embeddings)"
    )
    say(
        f"data: {len(data.train):,} training / {len(data.val):,} validation tokens, "
        f"{data.bytes_per_token['val']:.2f} bytes per token, vocabulary {vocab}"
    )
    say(
        f"run: {cfg.steps} steps x {tokens_per_step:,} tokens "
        f"({cfg.batch_size} x {cfg.grad_accum} accumulation x "
        f"{dist.world_size} process{'es' if dist.world_size > 1 else ''} x {context}), "
        f"{'Muon + AdamW' if cfg.use_muon else 'AdamW'}, device {dist.device} ({args.device_reason})"
    )

    try:
        result = train(model, data, cfg, device=dist.device)
    finally:
        cleanup_distributed()
    if not dist.is_main:
        return {}
    if result["resumed_from"] is not None:
        say(f"resumed from step {result['resumed_from']}")
    say(
        f"\nvalidation: loss {result['val_loss']:.4f} nats per token, {result['val_bpb']:.4f} bits per byte "
        f"(a uniform guess: {torch.log(torch.tensor(float(vocab))).item():.2f} nats)"
    )
    say(f"throughput: {result['tokens_per_second']:,.0f} tokens/s over {result['seconds']:.1f} s")

    model.eval()
    prompts = [tokenizer.encode(p).ids for p in PROMPTS[: args.samples]]
    g = torch.Generator(device=dist.device).manual_seed(args.seed)
    if prompts:  # --samples 0 generates nothing
        continuations = generate(
            model,
            prompts,
            args.max_new_tokens,
            temperature=0.8,
            top_k=50,
            generator=g,
            stop_tokens=tokenizer.token_to_id("<|endoftext|>"),
        )
        say("\nsamples (temperature 0.8, top-k 50):")
        for prompt, ids in zip(PROMPTS, continuations):
            say(f"  {prompt!r} -> {tokenizer.decode(ids)!r}")
    png = os.path.join(args.out, "loss.png")
    plot_losses(png, result)
    say(f"plot: {png}; checkpoint: {cfg.ckpt_dir}")
    return {
        "preset": args.preset,
        "params": model.num_params(),
        "steps": result["steps"],
        "val_loss": result["val_loss"],
        "val_bpb": result["val_bpb"],
        "final_train_loss": result["losses"][-1],
        "tokens_per_second": result["tokens_per_second"],
        "train_seconds": result["seconds"],
        "bytes_per_token": data.bytes_per_token["val"],
        "world_size": dist.world_size,
    }


if __name__ == "__main__":
    run_script(main)
