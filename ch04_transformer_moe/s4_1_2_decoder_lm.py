"""Section 4.1.2: the modern decoder-only LM, part by part.

``common/models/decoder.py`` builds a GPT/Llama-style decoder from a :class:`DecoderConfig` whose
fields are the design choices of the last six years: LayerNorm or RMSNorm (with or without weight),
Pre- or Post-norm, learned positions or RoPE, MHA / GQA / MQA, QK-norm, GELU / SwiGLU / ReLU²
feed-forwards, tied or untied embeddings. This script

1. builds the size presets (small, base, large) and counts their real parameters;
2. switches each choice on the small preset and shows what it does to the parameter count;
3. converts the model to transformers' ``LlamaForCausalLM`` and back, comparing logits;
4. trains a small model briefly on the book's embedded English corpus (``common.data``);
5. generates with the KV cache: greedy, temperature, top-k, top-p, a stop token, and a batch of prompts
   of different lengths, checking cached = uncached tokens and batched = one-by-one, with timings.

    python -m ch04_transformer_moe.s4_1_2_decoder_lm            # the book's run (a few minutes on CPU)
    python -m ch04_transformer_moe.s4_1_2_decoder_lm --quick    # seconds: tiny model, few steps

A reader sees the preset and variant tables, the Llama logit difference (~1e-6), the training loss
falling, and the generated text of each decoding method.
"""

from __future__ import annotations

import os
import time

import torch

from common.data import EOT, TokenData, get_tokenizer, load_corpus
from common.models.decoder import PRESETS, DecoderConfig, DecoderLM
from common.models.generation import decode_room_problem, generate
from common.models.hf_llama import decoder_to_hf
from common.plotting import pyplot, save_figure
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    int_between,
    parse_args,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import TrainConfig, train

VARIANTS = {
    "baseline (Llama-style)": {},
    "LayerNorm": dict(norm="layernorm"),
    "RMSNorm without weight": dict(norm="rmsnorm_noweight"),
    "Post-norm": dict(norm_placement="post"),
    "learned positions": dict(pos="learned"),
    "GQA (2 kv heads)": dict(n_kv_head=2),
    "MQA (1 kv head)": dict(n_kv_head=1),
    "QK-norm": dict(qk_norm=True),
    "GELU MLP": dict(ffn="gelu"),
    "ReLU² MLP": dict(ffn="relu2"),
    "tied embeddings": dict(tie_embeddings=True),
    "biases": dict(bias=True, norm="layernorm"),
}


def count_params(config: DecoderConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of a real DecoderLM built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    return model.num_params(), model.num_params(non_embedding=True)


PROMPTS = ["The function returns", "In Python, a", "An exception is raised when the"]
VOCAB = int_between(257, 65536)  # the 256 bytes and <|endoftext|>, up to what a 16-bit id holds


def hf_check(config: DecoderConfig, device: str, seed: int) -> float:
    """Max |logit difference| between our model and its LlamaForCausalLM conversion on random tokens."""
    torch.manual_seed(seed)
    ours = DecoderLM(config).to(device).eval()
    hf = decoder_to_hf(ours)
    idx = torch.randint(0, config.vocab_size, (2, min(64, config.context_length)), device=device)
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--vocab-size", type=VOCAB, default=2048, help="BPE vocabulary of the embedded corpus"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps of the demo model (default 600, quick: 40)",
    )
    parser.add_argument(
        "--d-model", type=width_int, default=None, help="width of the demo model (default 192, quick: 64)"
    )
    parser.add_argument(
        "--layers", type=count_int, default=None, help="layers of the demo model (default 4, quick: 2)"
    )
    parser.add_argument(
        "--context",
        type=count_int,
        default=None,
        help="context length of the demo model (default 128, quick: 64)",
    )
    parser.add_argument(
        "--new-tokens",
        type=positive_int,
        default=None,
        help="tokens generated per prompt (default 48, quick: 16)",
    )
    args = parse_args(parser, argv)
    quick_or_full(
        args, steps=(40, 600), d_model=(64, 192), layers=(2, 4), context=(64, 128), new_tokens=(16, 48)
    )
    if args.d_model % 4:
        parser.error(f"--d-model {args.d_model} must divide by the demo model's 4 heads")
    text = load_corpus()
    tokenizer = get_tokenizer(vocab_size=args.vocab_size, text=text)
    data = TokenData.from_text(text, tokenizer, context_length=args.context)  # a context too long: UsageError
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    problem = decode_room_problem(prompts, args.new_tokens, args.context)
    if problem:
        parser.error(f"--new-tokens {args.new_tokens}: {problem} (--context)")
    checks_done(args)
    device = args.device
    figures: dict = {}

    # 1. presets ------------------------------------------------------------------------------------
    print(f"1. presets (vocab {args.vocab_size}, SwiGLU, RoPE, RMSNorm, untied embeddings)")
    print(
        f"   {'preset':<8}{'layers':>7}{'d_model':>8}{'heads':>6}{'kv':>4}{'d_ff':>6}"
        f"{'params':>14}{'non-emb':>14}"
    )
    for name in PRESETS:
        cfg = DecoderConfig.preset(name, vocab_size=args.vocab_size)
        total, non_emb = count_params(cfg)
        figures[f"params_{name}"] = total
        print(
            f"   {name:<8}{cfg.n_layer:>7}{cfg.d_model:>8}{cfg.n_head:>6}{cfg.n_kv_head:>4}{cfg.ffn_dim:>6}"
            f"{total:>14,}{non_emb:>14,}"
        )

    # 2. variants -------------------------------------------------------------------------------------
    print("\n2. one choice at a time on the small preset")
    base_cfg = DecoderConfig.preset("small", vocab_size=args.vocab_size)
    base_total, _ = count_params(base_cfg)
    for label, change in VARIANTS.items():
        total, non_emb = count_params(base_cfg.replace(**change))
        key = label.split(" (")[0].lower().replace(" ", "_").replace("²", "2").replace("-", "_")
        figures[f"variant_params_{key}"] = total
        print(f"   {label:<24}{total:>12,} params  ({total - base_total:+,})")

    # 3. Hugging Face Llama ---------------------------------------------------------------------------
    check_cfg = DecoderConfig.preset("small", vocab_size=args.vocab_size, n_kv_head=2, context_length=128)
    if args.quick:
        check_cfg = check_cfg.replace(n_layer=2, d_model=128)
    diff = hf_check(check_cfg, device, args.seed)
    figures["hf_llama_max_abs_logit_diff"] = diff
    print(
        f"\n3. our model vs transformers.LlamaForCausalLM with the same weights ({check_cfg.n_layer} layers, "
        f"d_model {check_cfg.d_model}, GQA {check_cfg.n_head}/{check_cfg.n_kv_head}): "
        f"max |logit diff| = {diff:.2e}"
    )

    # 4. train a small model on the embedded corpus ---------------------------------------------------
    cfg = DecoderConfig(
        vocab_size=tokenizer.get_vocab_size(),
        context_length=args.context,
        n_layer=args.layers,
        d_model=args.d_model,
        n_head=4,
        n_kv_head=2,
        tie_embeddings=True,
    )
    model = DecoderLM(cfg).to(device)
    figures["demo_params"] = model.num_params()
    print(
        f"\n4. training a {model.num_params():,}-parameter model "
        f"(d_model {cfg.d_model}, {cfg.n_layer} layers, "
        f"GQA 4/2, tied) on {len(data.train):,} tokens of the embedded corpus for {args.steps} steps"
    )
    # the training loop of common.training (section 4.1.4 teaches it); plain AdamW here, evaluated at the end
    cfg_train = TrainConfig(
        steps=args.steps,
        batch_size=16,
        lr=3e-3,
        use_muon=False,
        warmup_steps=max(1, args.steps // 10),
        warmdown_frac=0.0,
        eval_every=0,
        eval_batches=4,
        eval_batch_size=16,
        seed=args.seed,
        dtype=args.dtype,
    )
    result = train(model, data, cfg_train, device=device)
    losses = result["losses"]
    k = max(1, min(10, args.steps // 10))
    figures["train_loss_initial"] = sum(losses[:k]) / k
    figures["train_loss_final"] = sum(losses[-k:]) / k
    figures["val_loss"] = result["val_loss"]
    model.eval()
    print(
        f"   loss {figures['train_loss_initial']:.2f} -> {figures['train_loss_final']:.2f}; "
        f"validation {figures['val_loss']:.2f} nats/token"
    )

    # 5. generation with the KV cache -----------------------------------------------------------------
    prompts_text = PROMPTS
    n = args.new_tokens
    eot = tokenizer.token_to_id(EOT)
    period = tokenizer.token_to_id(".")
    print(f"\n5. generation, {n} new tokens, prompt {prompts_text[0]!r}")
    methods = {
        "greedy": dict(),
        "temperature 0.8": dict(temperature=0.8),
        "top-k 20, T=0.8": dict(temperature=0.8, top_k=20),
        "top-p 0.9, T=0.8": dict(temperature=0.8, top_p=0.9),
        "greedy, stop at '.'": dict(stop_tokens=[period, eot]),
    }
    for label, kw in methods.items():
        gen = torch.Generator(device=device).manual_seed(args.seed)
        new = generate(model, prompts[:1], n, generator=gen, **kw)[0]
        print(f"   {label:<20} {prompts_text[0]!r} -> {tokenizer.decode(new)!r}")

    t0 = time.perf_counter()
    cached = generate(model, prompts, n)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    uncached = generate(model, prompts, n, use_cache=False)
    t_uncached = time.perf_counter() - t0
    one_by_one = [generate(model, [p], n)[0] for p in prompts]
    figures["batched_equals_unbatched"] = cached == one_by_one
    figures["cached_equals_uncached"] = cached == uncached
    figures["gen_tokens_per_s_cached"] = len(prompts) * n / t_cached
    figures["gen_tokens_per_s_uncached"] = len(prompts) * n / t_uncached
    print(
        f"   a batch of {len(prompts)} prompts of lengths {[len(p) for p in prompts]} (left-padded), greedy:"
    )
    for text_, new in zip(prompts_text, cached):
        print(f"     {text_!r} -> {tokenizer.decode(new)!r}")
    print(
        f"   batched = one at a time: {figures['batched_equals_unbatched']}; KV cache = full recomputation: "
        f"{figures['cached_equals_uncached']}"
    )
    print(
        f"   {figures['gen_tokens_per_s_cached']:.0f} tokens/s with the KV cache, "
        f"{figures['gen_tokens_per_s_uncached']:.0f} without "
        "(see benchmarks/bench_decoder.py for a fair race)"
    )

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title="decoder LM on the embedded corpus")
    print(f"\nloss curve: {save_figure(fig, os.path.join(args.out, 'loss.png'))}")
    return figures


if __name__ == "__main__":
    run_script(main)
