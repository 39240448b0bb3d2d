"""Section 4.1.1: the encoder-decoder Transformer from scratch, trained on a seq2seq task.

The model of "Attention Is All You Need" (``common/models/transformer.py``: multi-head attention,
sinusoidal positions, Post-LN encoder and decoder stacks, cross-attention) learns to read English
number words and write the digits, character by character:

    "three thousand four hundred and twelve"  ->  "3412"

Source and target are character-level; the decoder is trained with teacher forcing (cross-entropy on
the next digit) and evaluated by greedy decoding on numbers it never saw, scored by exact match.

    python -m ch04_transformer_moe.s4_1_1_transformer            # the book's run (a few minutes on CPU)
    python -m ch04_transformer_moe.s4_1_1_transformer --quick    # ~20 s: the loss falls, accuracy is low

A reader sees the model size, the loss falling (tqdm), a handful of held-out examples decoded, the
exact-match accuracy on held-out numbers, and ``loss.png`` in the output folder.
"""

from __future__ import annotations

import os
import random
import time

import torch
import torch.nn.functional as F

from common.models.transformer import Seq2SeqTransformer
from common.plotting import pyplot, save_figure
from common.progress import progress
from common.runner import parse_args, run_script, script_parser

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
PAD, BOS, EOS = 0, 1, 2


def number_to_words(n: int) -> str:
    """British English number words for 0 <= n < 1,000,000: 312 -> 'three hundred and twelve'."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words handles 0 <= n < 1,000,000, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))
    rest = n % 1000
    head = number_to_words(n // 1000) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_to_words(rest)


class CharVocab:
    """Characters <-> ids, with PAD=0, BOS=1, EOS=2 reserved."""

    def __init__(self, chars: str):
        self.chars = sorted(set(chars))
        self.index = {c: i + 3 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= 3:
                out.append(self.chars[i - 3])
        return "".join(out)


def make_split(max_number: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint train / held-out numbers from 0..max_number-1."""
    numbers = list(range(max_number))
    random.Random(seed).shuffle(numbers)
    return numbers[n_test:], numbers[:n_test]


def encode_batch(numbers: list[int], src_vocab: CharVocab, tgt_vocab: CharVocab, device: str):
    """(src, tgt_in, tgt_out): source words, target digits after BOS, and the digits followed by EOS."""
    src = [src_vocab.encode(number_to_words(n)) for n in numbers]
    tgt = [tgt_vocab.encode(str(n)) for n in numbers]
    s_len, t_len = max(map(len, src)), max(map(len, tgt)) + 1
    src_t = torch.full((len(numbers), s_len), PAD, dtype=torch.long)
    tgt_in = torch.full((len(numbers), t_len), PAD, dtype=torch.long)
    tgt_out = torch.full((len(numbers), t_len), -100, dtype=torch.long)  # -100: ignored by the loss
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_t[i, : len(s)] = torch.tensor(s)
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS] + t)
        tgt_out[i, : len(t) + 1] = torch.tensor(t + [EOS])
    return src_t.to(device), tgt_in.to(device), tgt_out.to(device)


@torch.no_grad()
def exact_match(model, numbers, src_vocab, tgt_vocab, device, batch_size=256) -> tuple[float, list[tuple]]:
    """Fraction of numbers whose greedy decoding is exactly their digits, and a few decoded examples."""
    model.eval()
    correct, examples = 0, []
    for i in range(0, len(numbers), batch_size):
        chunk = numbers[i : i + batch_size]
        src, _, _ = encode_batch(chunk, src_vocab, tgt_vocab, device)
        out = model.greedy_decode(src, BOS, EOS, max_len=8).tolist()
        for n, ids in zip(chunk, out):
            pred = tgt_vocab.decode(ids)
            correct += pred == str(n)
            if len(examples) < 6:
                examples.append((number_to_words(n), str(n), pred))
    model.train()
    return correct / len(numbers), examples


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--steps", type=int, default=800, help="training steps (quick: 120)")
    parser.add_argument("--batch-size", type=int, default=64, help="numbers per training batch (quick: 32)")
    parser.add_argument(
        "--max-number", type=int, default=10_000, help="numbers are drawn from 0..max-1 (quick: 1000)"
    )
    parser.add_argument(
        "--n-test", type=int, default=1000, help="held-out numbers for exact match (quick: 100)"
    )
    parser.add_argument("--d-model", type=int, default=128, help="model width (quick: 64)")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each (quick: 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--norm-first", action="store_true", help="Pre-LN instead of the paper's Post-LN")
    args = parse_args(parser, argv)
    if args.quick:
        args.steps, args.batch_size, args.max_number, args.n_test, args.d_model, args.layers = (
            120,
            32,
            1000,
            100,
            64,
            1,
        )
    device = args.device

    src_vocab = CharVocab("abcdefghijklmnopqrstuvwxyz -")
    tgt_vocab = CharVocab("0123456789")
    train_numbers, test_numbers = make_split(args.max_number, args.n_test, args.seed)
    print(
        f"task: number words -> digits, numbers 0..{args.max_number - 1}: {len(train_numbers)} for training, "
        f"{len(test_numbers)} held out"
    )
    print(f"  e.g. {number_to_words(train_numbers[0])!r} -> {train_numbers[0]!r}")

    model = Seq2SeqTransformer(
        len(src_vocab),
        len(tgt_vocab),
        d_model=args.d_model,
        n_head=4,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        d_ff=4 * args.d_model,
        dropout=0.0 if args.quick else 0.1,
        norm_first=args.norm_first,
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {'Pre' if args.norm_first else 'Post'}-LN Transformer, d_model={args.d_model}, "
        f"{args.layers}+{args.layers} layers, {n_params:,} parameters, on {device}"
    )

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(args.seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in (bar := progress(range(args.steps), desc="training", mininterval=1.0)):
        src, tgt_in, tgt_out = encode_batch(
            rng.sample(train_numbers, args.batch_size), src_vocab, tgt_vocab, device
        )
        logits = model(src, tgt_in)  # (batch, T, tgt_vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    train_seconds = time.perf_counter() - start

    def window_mean(xs):
        return sum(xs) / len(xs)

    k = max(1, min(10, args.steps // 10))
    initial, final = window_mean(losses[:k]), window_mean(losses[-k:])
    acc, examples = exact_match(model, test_numbers, src_vocab, tgt_vocab, device)
    print(
        f"\nloss: {initial:.3f} (mean of first {k} steps) -> {final:.3f} (last {k}), "
        f"{final / initial:.1%} of the start, in {train_seconds:.1f} s"
    )
    print("held-out examples (greedy decoding):")
    for words, target, pred in examples:
        print(f"  {words!r:<60} -> {pred!r:>9}  {'ok' if pred == target else 'WRONG, want ' + target}")
    print(f"exact match on {len(test_numbers)} held-out numbers: {acc:.1%}")

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats / digit)",
        yscale="log",
        title=f"number words -> digits: exact match {acc:.1%}",
    )
    plot_path = save_figure(fig, os.path.join(args.out, "loss.png"))
    print(f"loss curve: {plot_path}")
    return {
        "params": n_params,
        "steps": args.steps,
        "initial_loss": initial,
        "final_loss": final,
        "loss_ratio": final / initial,
        "exact_match": acc,
        "n_test": len(test_numbers),
        "train_seconds": train_seconds,
        "norm_first": args.norm_first,
    }


if __name__ == "__main__":
    run_script(main)
