"""Section 4.1.5: the small pretrained model that the later chapters quantize, prune and distil.

No model hub is needed: :func:`common.pretrained.pretrained_lm` trains a Llama-style decoder LM
(RMSNorm, RoPE, SwiGLU, pre-norm) on the embedded corpus the first time it is asked for, with a
progress bar, and caches it under ``.cache/`` keyed by its config, its training recipe and the corpus.
Later calls load the safetensors weights after checking their SHA-256, so a truncated or edited
cache is retrained, never trusted.  This script shows the model a later chapter gets: its size, how
long it took to train, its validation loss and bits per byte, and what it writes.

    python -m ch04_transformer_moe.s4_1_5_pretrained_model             # the book's "tiny" model
    python -m ch04_transformer_moe.s4_1_5_pretrained_model --retrain   # train it again, timed
    python -m ch04_transformer_moe.s4_1_5_pretrained_model --quick     # the seconds-sized "test" model

A reader sees whether the model came from the cache or was trained now (and how long training took,
then or now), its parameter count, validation loss (nats per token) against a uniform guess, bits
per byte, and a greedy and a sampled continuation of a few prompts.
"""

from __future__ import annotations

import math

import torch

from common.data import get_tokenizer
from common.env import torch_dtype
from common.models.generation import decode_room_problem, generate
from common.pretrained import SPECS, pretrained_lm
from common.runner import (
    add_dtype_flag,
    checks_done,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
)

PROMPTS = ["The return value of", "A class is"]


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--name", choices=sorted(SPECS), default=None, help="which model (default tiny; quick: test)"
    )
    parser.add_argument("--retrain", action="store_true", help="ignore the cache and train the model now")
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="tokens per continuation (default 40, quick: 12)",
    )
    args = parse_args(parser, argv)
    quick_or_full(args, name=("test", "tiny"), new_tokens=(12, 40))
    name, new_tokens = args.name, args.new_tokens
    spec = SPECS[name]  # the prompts and the new tokens must fit in its context
    tokenizer = get_tokenizer(spec["vocab_size"])
    problem = decode_room_problem(
        [tokenizer.encode(p).ids for p in PROMPTS], new_tokens, spec["model"]["context_length"]
    )
    if problem:
        parser.error(f"--new-tokens {new_tokens}: {problem}")
    checks_done(args)

    model, tokenizer, info = pretrained_lm(name, device=args.device, retrain=args.retrain)
    cfg = info["config"]
    how = "loaded from the cache" if info["cached"] else "trained now"
    print(
        f"\npretrained_lm({name!r}): {how}; {info['params']:,} parameters "
        f"({cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} heads, "
        f"vocab {cfg['vocab_size']}, context {cfg['context_length']})"
    )
    print(
        f"training: {info['steps']} steps on {info['train_tokens']:,} tokens in {info['seconds']:.0f} s "
        f"({info['tokens_per_second']:,.0f} tokens/s){' when it was cached' if info['cached'] else ''}"
    )
    uniform = math.log(cfg["vocab_size"])
    print(
        f"validation: {info['val_loss']:.3f} nats per token (a uniform guess: {uniform:.2f}), "
        f"{info['val_bpb']:.3f} bits per byte"
    )

    model = model.to(torch_dtype(args.dtype))  # this script's copy: the continuations decode in --dtype
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    stop = tokenizer.token_to_id("<|endoftext|>")
    greedy = generate(model, prompts, new_tokens, stop_tokens=stop)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    sampled = generate(model, prompts, new_tokens, temperature=0.8, top_k=50, stop_tokens=stop, generator=g)
    print("\ncontinuations (greedy | temperature 0.8, top-k 50):")
    for prompt, a, b in zip(PROMPTS, greedy, sampled):
        print(f"  {prompt!r}\n    greedy : {tokenizer.decode(a)!r}\n    sampled: {tokenizer.decode(b)!r}")
    return {
        "model": name,
        "cached": info["cached"],
        "params": info["params"],
        "train_seconds": info["seconds"],
        "val_loss": info["val_loss"],
        "val_bpb": info["val_bpb"],
        "uniform_loss": uniform,
    }


if __name__ == "__main__":
    run_script(main)
