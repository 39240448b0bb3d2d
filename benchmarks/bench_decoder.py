"""Decoder LM speed, measured side by side in one run on the same weights.

    python -m benchmarks.bench_decoder [--quick] [--device cpu|cuda] [--json PATH]

1. decoding: our KV-cache ``generate`` vs transformers' ``LlamaForCausalLM.generate`` (greedy, same
   prompt, same weights, both must produce the same tokens; transformers with its defaults: a dynamic
   KV cache, its default attention implementation, recorded in the JSON) and vs our own decoding
   without the cache (recomputing the whole sequence for every new token); tokens per second. Ours
   runs twice: on the model as it is, and through :class:`common.models.decode_layout.DecodeLayout`
   (column-major copies of the matrices held apart from the model, opt-in; its memory in the JSON);
2. training: one step (forward, backward, AdamW step) of our DecoderLM vs LlamaForCausalLM at the same
   config and batch, with the same optimizer, and the step's floor: the same GEMMs, causal attention and
   AdamW step run bare (``train_floor``), which bounds what any implementation in these kernels can gain;
3. the loss head alone (lm_head + cross-entropy, forward and backward, on the training batch's hidden
   states): ``F.cross_entropy(F.linear(h, W), y)`` vs our fused chunked version at several chunk sizes
   (``--ce-chunks``), the measurement behind ``fused_cross_entropy.LOGITS_PER_CHUNK``.

Each measurement is warmed up, then repeated, alternating the contenders so that a noisy machine hurts
both alike; the table shows medians, and each ratio is the median over the rounds of the two times
measured in the same round (so that slow drifts of the machine cancel), with whether its goal is met;
the JSON keeps every repeat. Goals: decoding >= 1.2x HF and >= 5x no-cache at 256 new tokens (with the
column-major copy; the plain ``generate``'s ratios are reported beside);
a training step no slower than HF's and within 1.2x its floor. The benchmark keeps freed memory for
reuse (:func:`common.env.keep_freed_memory`) unless ``--system-malloc``; the JSON records which.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch
import torch.nn.functional as F

from common.env import choose_device, seed_everything
from common.models.decode_layout import DecodeLayout
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.fused_cross_entropy import linear_cross_entropy
from common.models.generation import generate
from common.models.hf_llama import decoder_to_hf
from common.runner import write_json
from common.timing import add_malloc_flag, apply_malloc_flag, paired_ratio, race

FORMAT = 3  # the JSON's layout; benchmarks.speed_section reads only this one
# speed-ups ours must reach (alternative's time / ours)
# the decode goals are measured on the opt-in column-major copy; the plain generate's ratios stand beside
GOALS = {"decode_vs_hf": 1.2, "decode_vs_no_cache": 5.0, "train_step_vs_hf": 1.0}
TRAIN_X_FLOOR_GOAL = 1.2  # the most our training step may cost, as a multiple of its floor
FLOOR = "floor (GEMMs, attention, AdamW)"
COLUMN_MAJOR = "ours (KV cache, column-major copy)"  # common.models.decode_layout, opt-in


def bench_decode(
    model: DecoderLM, hf, prompt_len: int, new_tokens: int, repeats: int, device: str, seed: int
):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).tolist()
    hf_input = torch.tensor(prompt, device=device)
    hf_kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(hf_input),
    )
    fast = DecodeLayout(model)  # column-major copies of the matrices, held apart from the model
    ours = generate(model, prompt, new_tokens)[0]
    theirs = hf.generate(hf_input, **hf_kwargs)[0, prompt_len:].tolist()
    same_tokens = ours == theirs == generate(fast, prompt, new_tokens)[0]
    times = race(
        {
            "ours (KV cache)": lambda: generate(model, prompt, new_tokens),
            COLUMN_MAJOR: lambda: generate(fast, prompt, new_tokens),
            "HF generate": lambda: hf.generate(hf_input, **hf_kwargs),
            "ours (no cache)": lambda: generate(model, prompt, new_tokens, use_cache=False),
        },
        repeats,
        device,
    )
    return times, same_tokens, fast.extra_bytes


def bench_train(model: DecoderLM, hf, batch: int, seq: int, repeats: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g).to(device)
    x = idx[:, :-1]
    # the targets HF derives from labels=x: the next token, nothing after the last one
    y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    ours, theirs = copy.deepcopy(model).train(), copy.deepcopy(hf).train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    losses = {"ours": [], "hf": []}

    def step_ours():
        _, loss = ours(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        losses["ours"].append(loss.item())

    def step_hf():
        loss = theirs(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        losses["hf"].append(loss.item())

    contenders = {
        "ours train step": step_ours,
        "HF train step": step_hf,
        FLOOR: train_floor(model, batch, seq, device, seed),
    }
    return race(contenders, repeats, device), losses


def train_floor(model: DecoderLM, batch: int, seq: int, device: str, seed: int):
    """The part of a training step that no implementation in these kernels can skip: every matrix
    multiply (forward, input gradient and weight gradient of each weight matrix, the output head
    included) in the layouts ``nn.Linear`` uses, causal attention forward and backward with PyTorch's
    fused kernel, and the AdamW step over the same parameters. Left out: norms, activations, RoPE,
    residual adds, softmax and loss, the embedding's gradient and every allocation (outputs are
    preallocated). Both contenders do all of this, so ``step / floor`` says how much each spends
    on top of it."""
    g = torch.Generator().manual_seed(seed)
    c, tokens = model.config, batch * seq

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    gemms = []  # (a, b, out): out = a @ b
    for lin in (m for m in model.modules() if type(m) is torch.nn.Linear):
        w = lin.weight.detach()  # (out, in)
        x, dy = rand(tokens, w.shape[1]), rand(tokens, w.shape[0])
        gemms += [
            (x, w.t(), torch.empty(tokens, w.shape[0], device=device)),  # forward
            (dy, w, torch.empty(tokens, w.shape[1], device=device)),  # input gradient
            (dy.t(), x, torch.empty_like(w)),  # weight gradient
        ]
    q = rand(batch, c.n_head, seq, c.head_dim).requires_grad_()
    k, v = (rand(batch, c.n_kv_head, seq, c.head_dim).requires_grad_() for _ in range(2))
    dout = rand(batch, c.n_head, seq, c.head_dim)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def run():
        for a, b, out in gemms:
            torch.mm(a, b, out=out)
        for _ in range(c.n_layer):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.n_kv_head != c.n_head)
            torch.autograd.grad(y, (q, k, v), dout)
        opt.step()

    return run


def bench_loss_head(model: DecoderLM, tokens: int, chunks: list[int], repeats: int, device: str, seed: int):
    """Forward + backward of the loss head alone: unfused vs fused at each chunk size (tokens per chunk)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    h = torch.randn(tokens, c.d_model, generator=g).to(device).requires_grad_()
    w = model.lm_head.weight.detach().clone().requires_grad_()
    y = torch.randint(0, c.vocab_size, (tokens,), generator=g).to(device)

    def unfused():
        F.cross_entropy(F.linear(h, w), y, ignore_index=-100).backward()
        h.grad = w.grad = None

    def fused(chunk):
        def run():
            linear_cross_entropy(h, w, y, chunk_size=chunk).backward()
            h.grad = w.grad = None

        return run

    contenders = {"unfused": unfused, **{f"fused, chunk {n}": fused(n) for n in chunks}}
    return race(contenders, repeats, device)


def report(result: dict, header: bool = True) -> str:
    """The benchmark's printed tables, from its JSON alone (so the chapter README can show a run)."""
    head_med, goals = result["loss_head_median_seconds"], result["goals"]
    tokens, vocab = result["train_batch"] * result["train_seq"], result["config"]["vocab_size"]
    losses, floor = result["train_losses"], result["train_step_x_floor"]
    lines = [result["setup"], result["workload"]] if header else []
    lines += ["", f"{'measurement (median)':<44}{'value':>12}", "-" * 56]
    lines += [f"{name:<44}{value:>12.1f}" for name, value in result["values"].items()]
    lines += ["", f"loss head fwd+bwd, {tokens} tokens x vocab {vocab}  {'ms':>10}{'vs unfused':>12}"]
    lines.append("-" * 60)
    for name, value in head_med.items():
        lines.append(f"{name:<48}{1e3 * value:>10.1f}{head_med['unfused'] / value:>11.2f}x")
    lines += [
        "",
        "training step over its floor (every GEMM, causal attention and the AdamW step, nothing else): "
        f"ours {floor['ours']:.2f}x, HF {floor['hf']:.2f}x",
        f"(no implementation in these kernels can be more than {floor['hf']:.2f}x faster than HF here)",
    ]
    met = result["goals_met"]
    lines += ["", f"{'goal':<36}{'measured':>10}{'goal':>8}  met", "-" * 60]
    lines += [
        f"{name + ' (at least)':<36}{value:>9.2f}x{goals[name]:>7.1f}x  {'yes' if met[name] else 'NO'}"
        for name, value in result["ratios"].items()
    ]
    plain = result["plain_generate_ratios"]
    lines.append(
        f"(decode goals measured on the column-major copy, {result['column_major_copy_mb']:.0f} MB more "
        f"memory; plain generate: {plain['decode_vs_hf']:.2f}x HF, "
        f"{plain['decode_vs_no_cache']:.2f}x no cache)"
    )
    lines.append(
        f"{'train_step_x_floor (at most)':<36}{floor['ours']:>9.2f}x{result['train_x_floor_goal']:>7.1f}x  "
        f"{'yes' if met['train_step_x_floor'] else 'NO'}"
    )
    lines += [
        "",
        f"same greedy tokens as HF: {result['same_tokens_as_hf']}; training losses step by step, ours vs HF: "
        f"{losses['ours'][0]:.5f} vs {losses['hf'][0]:.5f} at the first step, "
        f"max |diff| {result['train_loss_max_abs_diff']:.1e} over {len(losses['ours'])} steps",
    ]
    if result["quick"]:
        lines.append("(quick mode: a small model and few tokens; the goals are for the full run)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats, a smaller model (CI)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    parser.add_argument(
        "--json", default="benchmarks/results/bench_decoder.json", help="where to write results"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (quick: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument(
        "--ce-chunks",
        default="256,512,1024,2048",
        help="comma-separated tokens per chunk to time the fused loss head at (the default chunk is "
        "LOGITS_PER_CHUNK // vocab)",
    )
    add_malloc_flag(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 steadies timings on a busy machine",
    )
    args = parser.parse_args(argv)
    device, reason = choose_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    malloc = apply_malloc_flag(args)
    if args.quick:
        cfg = DecoderConfig.preset("small", n_layer=2, d_model=128, vocab_size=4096, context_length=512)
        prompt_len, new_tokens, batch, seq, repeats = 16, 64, 4, 64, 2
    else:
        cfg = DecoderConfig.preset("small", vocab_size=8192, context_length=512)
        prompt_len, new_tokens, batch, seq, repeats = 32, 256, 8, 256, args.repeats

    model = DecoderLM(cfg).to(device).eval()
    hf = decoder_to_hf(model)
    setup = (
        f"{'quick: ' if args.quick else ''}DecoderLM {cfg.n_layer} layers, d_model {cfg.d_model}, "
        f"{cfg.n_head} heads / {cfg.n_kv_head} kv, vocab {cfg.vocab_size}, {model.num_params():,} params, "
        f"fp32, "
        f"{device} ({torch.get_num_threads()} threads, malloc: {malloc}); "
        f"HF attention: {hf.config._attn_implementation}"
    )
    workload = (
        f"decoding: batch 1, prompt {prompt_len} tokens, {new_tokens} new tokens, greedy; "
        f"training: batch {batch} x {seq} tokens, AdamW; {repeats} repeats after a warm-up"
    )
    print(f"{setup}\n{workload}", flush=True)

    dec_times, same_tokens, copy_bytes = bench_decode(
        model, hf, prompt_len, new_tokens, repeats, device, args.seed
    )
    train_times, losses = bench_train(model, hf, batch, seq, repeats, device, args.seed)
    chunks = sorted({min(int(n), batch * seq) for n in args.ce_chunks.split(",")})
    head_times = bench_loss_head(model, batch * seq, chunks, repeats, device, args.seed)
    med = {k: statistics.median(v) for k, v in {**dec_times, **train_times}.items()}
    head_med = {k: statistics.median(v) for k, v in head_times.items()}

    rows = [
        ("decode tokens/s: ours (KV cache)", new_tokens / med["ours (KV cache)"]),
        ("decode tokens/s: ours, column-major copy", new_tokens / med[COLUMN_MAJOR]),
        ("decode tokens/s: HF generate", new_tokens / med["HF generate"]),
        ("decode tokens/s: ours (no cache)", new_tokens / med["ours (no cache)"]),
        ("train step ms: ours", 1e3 * med["ours train step"]),
        ("train step ms: HF Llama", 1e3 * med["HF train step"]),
        ("train step ms: floor", 1e3 * med[FLOOR]),
    ]
    times = {**dec_times, **train_times}
    ratios = {
        name: paired_ratio(times[slow], times[fast])
        for name, slow, fast in [
            ("decode_vs_hf", "HF generate", COLUMN_MAJOR),
            ("decode_vs_no_cache", "ours (no cache)", COLUMN_MAJOR),
            ("train_step_vs_hf", "HF train step", "ours train step"),
        ]
    }
    plain_ratios = {  # generate on the model as it is, no copy
        "decode_vs_hf": paired_ratio(times["HF generate"], times["ours (KV cache)"]),
        "decode_vs_no_cache": paired_ratio(times["ours (no cache)"], times["ours (KV cache)"]),
    }
    train_x_floor = {
        "ours": paired_ratio(times["ours train step"], times[FLOOR]),
        "hf": paired_ratio(times["HF train step"], times[FLOOR]),
    }
    loss_diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))
    goals_met = {k: ratios[k] >= GOALS[k] for k in GOALS}
    goals_met["train_step_x_floor"] = train_x_floor["ours"] <= TRAIN_X_FLOOR_GOAL

    result = {
        "format": FORMAT,
        "setup": setup,
        "workload": workload,
        "device": device,
        "device_reason": reason,
        "quick": args.quick,
        "malloc": malloc,
        "hf_settings": {
            "attn_implementation": hf.config._attn_implementation,
            "generate": "defaults (dynamic KV cache), greedy: do_sample=False",
        },
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "config": cfg.to_dict(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "train_batch": batch,
        "train_seq": seq,
        "repeats": repeats,
        "seconds": {k: v for k, v in {**dec_times, **train_times}.items()},
        "median_seconds": med,
        "loss_head_seconds": head_times,
        "loss_head_median_seconds": head_med,
        "values": dict(rows),
        "ratios": ratios,
        "plain_generate_ratios": plain_ratios,
        "column_major_copy_mb": copy_bytes / 1e6,
        "goals": GOALS,
        "train_x_floor_goal": TRAIN_X_FLOOR_GOAL,
        "goals_met": goals_met,
        "train_step_x_floor": train_x_floor,
        "same_tokens_as_hf": same_tokens,
        # what one decode step streams (the embedding table is only looked up)
        "weight_matrix_mb": sum(
            m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear
        )
        / 1e6,
        "train_losses": losses,
        "train_loss_max_abs_diff": loss_diff,
    }
    print(report(result, header=False))
    write_json(args.json, result)
    print(f"results: {args.json}")
    return result


if __name__ == "__main__":
    main()
