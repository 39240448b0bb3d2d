"""Section 4.1.1: the encoder-decoder Transformer from scratch, trained as a translator.

The model of "Attention Is All You Need" (``common/models/transformer.py``: multi-head attention,
sinusoidal positions, Post-LN encoder and decoder stacks, cross-attention) was built to translate,
and the book's reader project trains it as a translation model between natural languages, on a
parallel corpus. This script needs no download, so its parallel corpus is generated: English number
words translated into German and French number words, as ``num2words`` writes them. That is real
translation, with the reordering and the spelling rules of each language:

    <de> twenty-one                             ->  einundzwanzig              (units before tens)
    <fr> seventy-one                            ->  soixante et onze           (60 + 11)
    <de> three thousand, four hundred and twelve ->  dreitausendvierhundertzwölf
    <fr> two hundred                            ->  deux cents   (but: two hundred and one -> deux cent un)

One model learns both directions: the source starts with a target-language token (``<de>`` or
``<fr>``), as in Google's multilingual NMT. Source and target are character-level; the decoder is
trained with teacher forcing under a warm-up + cosine learning-rate schedule (``common.training.lr_at``)
and evaluated by greedy decoding on numbers it never saw in either language, scored by exact match
and by ``sacrebleu``'s corpus BLEU and chrF. A German number is one word, so German BLEU counts
character n-grams (sacrebleu's ``char`` tokenizer) where French BLEU counts words.

    python -m ch04_transformer_moe.s4_1_1_transformer            # the book's run (a few minutes on CPU)
    python -m ch04_transformer_moe.s4_1_1_transformer --quick    # seconds: the loss falls, scores are low
    python -m ch04_transformer_moe.s4_1_1_transformer --languages de --norm-first

A reader sees the task and the model size, the loss falling (a progress bar), held-out examples decoded in
each language, exact match, BLEU and chrF per language, and ``loss.png`` in the output folder.
"""

from __future__ import annotations

import os
import random
import time

import sacrebleu
import torch
import torch.nn.functional as F
from num2words import num2words

from common.models.transformer import Seq2SeqTransformer
from common.plotting import pyplot, save_figure
from common.progress import progress
from common.runner import (
    add_dtype_flag,
    checks_done,
    count_int,
    int_between,
    parse_args,
    positive_float,
    positive_int,
    quick_or_full,
    run_script,
    script_parser,
    width_int,
)
from common.training import autocast_for, lr_at

LANGUAGES = {"de": "German", "fr": "French"}
BLEU_TOKENIZE = {"de": "char", "fr": "13a"}  # German numbers are one word: BLEU over characters
PAD, BOS, EOS = 0, 1, 2
HEADS = 4
SPECIALS = 3  # PAD, BOS, EOS come before the language tags and the characters


def number_words(n: int, lang: str) -> str:
    """``n`` written out in ``lang`` ("en", "de", "fr") by num2words: 21 -> 'einundzwanzig' in German."""
    return num2words(n, lang=lang)


def make_split(max_number: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """Disjoint (training, held-out) numbers from 0..max_number-1: no held-out number is ever trained on,
    in any language."""
    if not 0 < n_test < max_number:
        raise ValueError(f"need 0 < n_test < max_number, got n_test={n_test}, max_number={max_number}")
    numbers = list(range(max_number))
    random.Random(seed).shuffle(numbers)
    return numbers[n_test:], numbers[:n_test]


def parallel_corpus(numbers: list[int], languages: list[str]) -> list[tuple[str, str, str]]:
    """(target language, English source, translation) for every number and target language."""
    return [(lang, number_words(n, "en"), number_words(n, lang)) for n in numbers for lang in languages]


class CharVocab:
    """Ids of PAD=0, BOS=1, EOS=2, then the ``tags`` (whole tokens such as ``<de>``), then characters."""

    def __init__(self, texts, tags: tuple[str, ...] = ()):
        self.tags = {tag: SPECIALS + i for i, tag in enumerate(tags)}
        self.chars = sorted(set("".join(texts)))
        first = SPECIALS + len(tags)
        self.index = {c: first + i for i, c in enumerate(self.chars)}
        self.first_char = first

    def __len__(self) -> int:
        return self.first_char + len(self.chars)

    def encode(self, text: str, tag: str | None = None) -> list[int]:
        return ([self.tags[tag]] if tag else []) + [self.index[c] for c in text]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= self.first_char:
                out.append(self.chars[i - self.first_char])
        return "".join(out)


def encode_batch(pairs, src_vocab: CharVocab, tgt_vocab: CharVocab, device: str):
    """(src, tgt_in, tgt_out) for (lang, source, target) triples: ``<lang>`` + source characters;
    BOS + target characters; target characters + EOS (-100 where padded, ignored by the loss)."""
    src = [src_vocab.encode(s, tag=f"<{lang}>") for lang, s, _ in pairs]
    tgt = [tgt_vocab.encode(t) for _, _, t in pairs]
    s_len, t_len = max(map(len, src)), max(map(len, tgt)) + 1
    src_t = torch.full((len(pairs), s_len), PAD, dtype=torch.long)
    tgt_in = torch.full((len(pairs), t_len), PAD, dtype=torch.long)
    tgt_out = torch.full((len(pairs), t_len), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_t[i, : len(s)] = torch.tensor(s)
        tgt_in[i, : len(t) + 1] = torch.tensor([BOS] + t)
        tgt_out[i, : len(t) + 1] = torch.tensor(t + [EOS])
    return src_t.to(device), tgt_in.to(device), tgt_out.to(device)


@torch.no_grad()
def translate(
    model, pairs, src_vocab, tgt_vocab, device, max_len: int, batch_size=250, dtype: str = "fp32"
) -> list[str]:
    """Greedy translations of the sources of ``pairs`` (under autocast to ``dtype``)."""
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        src, _, _ = encode_batch(pairs[i : i + batch_size], src_vocab, tgt_vocab, device)
        with autocast_for(device, dtype):
            ids = model.greedy_decode(src, BOS, EOS, max_len).tolist()
        out += [tgt_vocab.decode(row) for row in ids]
    model.train()
    return out


def scores(hypotheses: list[str], references: list[str], bleu_tokenize: str = "13a") -> dict:
    """Exact match (share of identical strings), and sacrebleu's corpus BLEU and chrF (0-100).

    BLEU counts word n-grams up to 4 (``"13a"``, sacrebleu's default); a German number below a million
    is a single word, so German BLEU counts characters instead (``"char"``, as sacrebleu does for
    languages written without spaces)."""
    return {
        "exact_match": sum(h == r for h, r in zip(hypotheses, references)) / len(references),
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenize).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    add_dtype_flag(parser)
    parser.add_argument(
        "--languages", default="de,fr", help="target languages, comma-separated, of: de, fr (default both)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default 800, quick: 150)"
    )
    parser.add_argument(
        "--batch-size", type=count_int, default=None, help="sentence pairs per batch (default 64, quick: 32)"
    )
    parser.add_argument(
        "--max-number",
        type=int_between(2, 10**7),  # every number's words in every language are held in memory
        default=None,
        help="numbers are drawn from 0..max-1 (default 10000, quick: 1000)",
    )
    parser.add_argument(
        "--n-test",
        type=positive_int,
        default=None,
        help="held-out numbers, each scored in every language (default 500, quick: 50)",
    )
    parser.add_argument(
        "--d-model", type=width_int, default=None, help="model width (default 128, quick: 64)"
    )
    parser.add_argument(
        "--layers", type=count_int, default=None, help="encoder and decoder layers each (default 2, quick: 1)"
    )
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--norm-first", action="store_true", help="Pre-LN instead of the paper's Post-LN")
    args = parse_args(parser, argv)
    languages = [lang.strip() for lang in args.languages.split(",") if lang.strip()]
    if not languages or any(lang not in LANGUAGES for lang in languages):
        parser.error(
            f"--languages takes a comma-separated list of {', '.join(LANGUAGES)}, got {args.languages!r}"
        )
    quick_or_full(args, steps=(150, 800), batch_size=(32, 64), max_number=(1000, 10_000), n_test=(50, 500))
    quick_or_full(args, d_model=(64, 128), layers=(1, 2))
    if not 0 < args.n_test < args.max_number:
        parser.error(f"--n-test must lie in (0, --max-number={args.max_number}), got {args.n_test}")
    if args.d_model % HEADS:
        parser.error(f"--d-model {args.d_model} must divide by the {HEADS} attention heads")
    checks_done(args)
    device = args.device

    train_numbers, test_numbers = make_split(args.max_number, args.n_test, args.seed)
    train_pairs = parallel_corpus(train_numbers, languages)
    test_pairs = parallel_corpus(test_numbers, languages)
    tags = tuple(f"<{lang}>" for lang in LANGUAGES)
    src_vocab = CharVocab((s for _, s, _ in train_pairs + test_pairs), tags)
    tgt_vocab = CharVocab(t for _, _, t in train_pairs + test_pairs)
    max_len = max(len(t) for _, _, t in train_pairs + test_pairs) + 1
    print(
        f"task: English number words -> {' and '.join(LANGUAGES[lang] for lang in languages)} (num2words), "
        f"numbers 0..{args.max_number - 1}: {len(train_numbers)} for training, {len(test_numbers)} held out"
    )
    print(f"  {len(train_pairs):,} training pairs, e.g.")
    for lang, src, tgt in train_pairs[: 2 * len(languages)]:
        print(f"    <{lang}> {src!r} -> {tgt!r}")

    model = Seq2SeqTransformer(
        len(src_vocab),
        len(tgt_vocab),
        d_model=args.d_model,
        n_head=HEADS,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        d_ff=4 * args.d_model,
        dropout=0.0 if args.quick else 0.1,
        norm_first=args.norm_first,
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {'Pre' if args.norm_first else 'Post'}-LN Transformer, d_model={args.d_model}, "
        f"{args.layers}+{args.layers} layers, {n_params:,} parameters, characters in {len(src_vocab)} / "
        f"out {len(tgt_vocab)}, on {device}"
    )

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # warm-up + cosine to a tenth, as the reader project does
        opt, lambda s: lr_at(min(s, args.steps - 1), args.steps, warmup, final_ratio=0.1, schedule="cosine")
    )
    rng = random.Random(args.seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in (bar := progress(range(args.steps), desc="training", mininterval=1.0)):
        batch = rng.sample(train_pairs, args.batch_size)
        src, tgt_in, tgt_out = encode_batch(batch, src_vocab, tgt_vocab, device)
        with autocast_for(device, args.dtype):
            logits = model(src, tgt_in)  # (batch, T, tgt_vocab)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    train_seconds = time.perf_counter() - start

    k = max(1, min(10, args.steps // 10))
    initial, final = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"\nloss: {initial:.3f} (mean of first {k} steps) -> {final:.3f} (last {k}), "
        f"{final / initial:.1%} of the start, in {train_seconds:.1f} s"
    )
    figures: dict = {
        "params": n_params,
        "steps": args.steps,
        "initial_loss": initial,
        "final_loss": final,
        "loss_ratio": final / initial,
        "n_test": len(test_numbers),
        "train_seconds": train_seconds,
        "norm_first": args.norm_first,
    }
    for lang in languages:
        pairs = [p for p in test_pairs if p[0] == lang]
        hyps = translate(model, pairs, src_vocab, tgt_vocab, device, max_len, dtype=args.dtype)
        refs = [t for _, _, t in pairs]
        s = scores(hyps, refs, BLEU_TOKENIZE[lang])
        print(f"\n{LANGUAGES[lang]}, held-out numbers (greedy decoding):")
        for (_, src, ref), hyp in list(zip(pairs, hyps))[:5]:
            print(f"  {src!r:<50} -> {hyp!r}  {'ok' if hyp == ref else 'WRONG, want ' + repr(ref)}")
        print(
            f"  exact match {s['exact_match']:.1%}, BLEU {s['bleu']:.1f} ({BLEU_TOKENIZE[lang]} tokens), "
            f"chrF {s['chrf']:.1f} "
            f"on {len(pairs)} held-out numbers"
        )
        figures.update({f"{name}_{lang}": value for name, value in s.items()})

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    title = ", ".join(f"{lang} {figures[f'exact_match_{lang}']:.0%}" for lang in languages)
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats / character)",
        yscale="log",
        title=f"English -> {'/'.join(languages)} number words: exact match {title}",
    )
    plot_path = save_figure(fig, os.path.join(args.out, "loss.png"))
    print(f"\nloss curve: {plot_path}")
    return figures


if __name__ == "__main__":
    run_script(main)
