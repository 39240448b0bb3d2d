"""Which language model a compression script works on, and how good it is on held-out text.

By default the project's own trained LM (:func:`common.pretrained.pretrained_lm`: ``"tiny"``, or
``"test"`` in quick mode); with ``--hf-path DIR`` any local Hugging Face causal-LM folder (its
``config.json``, weights and tokenizer; nothing is downloaded)::

    parser = script_parser(__doc__)
    add_source_args(parser)
    args = parse_args(parser, argv)
    source = load_source(parser, args)      # a bad --hf-path is a one-line parser error
    print(source.describe(), evaluate_lm(source.model, source.data))

A Llama-architecture folder becomes our :class:`~common.models.decoder.DecoderLM` (through
:func:`common.models.hf_llama.decoder_from_hf`), so every script can take it apart; any other
architecture is wrapped in :class:`HFCausalLM` (logits out, as our model), which serves the scripts
that only need a forward pass; :meth:`LMSource.decoder` tells the others with a one-line error.
The held-out text is
the validation split of the embedded corpus (:class:`common.data.TokenData`), tokenized by the model's
own tokenizer, so loss, perplexity and bits per byte of different models are measured on the same text.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.data import EOT, TokenData, load_corpus, split_text, token_byte_lengths

DEFAULT_CONTEXT = 128  # longest window an --hf-path model is evaluated on
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """``--model NAME`` (the project's pretrained LM) and ``--hf-path DIR`` (a local HF folder)."""
    from common.pretrained import SPECS

    g = parser.add_argument_group("which model")
    g.add_argument(
        "--model",
        choices=sorted(SPECS),
        default=None,
        help="the project's own trained LM (default tiny; quick mode: test)",
    )
    g.add_argument(
        "--hf-path",
        metavar="DIR",
        default=None,
        help="a local Hugging Face causal-LM folder (config.json, weights, tokenizer) instead",
    )


def hf_folder_problem(path: str) -> str | None:
    """Why ``path`` is not a usable Hugging Face causal-LM folder, or None when it looks like one."""
    folder = Path(path)
    if not folder.is_dir():
        return f"--hf-path {path}: no such folder"
    if not (folder / "config.json").is_file():
        return f"--hf-path {path}: no config.json, not a Hugging Face model folder"
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        return f"--hf-path {path}: no weights ({' or '.join(WEIGHT_FILES)})"
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return f"--hf-path {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    return None


class HFCausalLM(nn.Module):
    """A transformers causal LM behind our model's calling convention: ``model(idx) -> (logits, None)``."""

    def __init__(self, hf_model, context_length: int):
        super().__init__()
        self.hf = hf_model
        self.context_length = context_length

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **_):
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (batch, seq, vocab)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        return logits, loss


@dataclass
class LMSource:
    """A model with its tokenizer and its held-out data. ``kind`` is "pretrained" or "hf"."""

    model: nn.Module
    data: TokenData
    kind: str
    name: str
    encode_fn: object = field(repr=False)
    decode_fn: object = field(repr=False)
    eot_id: int | None = None
    info: dict = field(default_factory=dict)
    tokenizer: object = field(default=None, repr=False)  # the project's tokenizers.Tokenizer ("pretrained")

    def encode(self, text: str) -> list[int]:
        return self.encode_fn(text)

    def decode(self, ids: list[int]) -> str:
        return self.decode_fn(ids)

    def decoder(self, what: str = "this script"):
        """The model as a DecoderLM, or a ValueError saying that ``what`` needs one."""
        from common.models.decoder import DecoderLM

        if not isinstance(self.model, DecoderLM):
            arch = getattr(getattr(self.model, "hf", None), "config", None)
            raise ValueError(
                f"{what} needs a Llama-architecture model it can take apart; {self.name} is "
                f"model_type={getattr(arch, 'model_type', '?')!r}"
            )
        return self.model

    def hf_folder(self, out_dir: str) -> str:
        """A Hugging Face folder of this model that libraries (GPTQModel) can load: the ``--hf-path``
        folder itself, or the project's LM written to ``out_dir`` by :func:`save_hf_folder`."""
        if self.kind == "hf":
            return self.info["path"]
        return save_hf_folder(self.decoder("a Hugging Face folder"), self.tokenizer, out_dir)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.name} ({self.kind}, {type(self.model).__name__}, {params:,} parameters)"


def load_hf_folder(path: str, device: str = "cpu", context_length: int = DEFAULT_CONTEXT) -> LMSource:
    """An :class:`LMSource` from a local Hugging Face folder (fp32, eval mode). ValueError if it is not
    one (see :func:`hf_folder_problem`)."""
    problem = hf_folder_problem(path)
    if problem:
        raise ValueError(problem)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from common.models.hf_llama import decoder_from_hf

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a truncated weights file: SafetensorError
        raise ValueError(f"--hf-path {path}: cannot load it as a causal LM: {str(e).splitlines()[0]}") from e
    hf.eval()
    ctx = min(context_length, getattr(config, "max_position_embeddings", context_length) or context_length)
    if config.model_type == "llama":
        model = decoder_from_hf(hf)
        del hf
    else:
        model = HFCausalLM(hf, ctx)
    eot = tokenizer.eos_token_id
    data = _hf_token_data(tokenizer, ctx, eot, model_vocab=config.vocab_size)
    return LMSource(
        model.to(device).eval(),
        data,
        "hf",
        os.path.basename(os.path.normpath(path)),
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        lambda ids: tokenizer.decode(ids),
        eot,
        {"path": str(path), "model_type": config.model_type},
    )


def _hf_token_data(tokenizer, context_length: int, eot: int | None, model_vocab: int) -> TokenData:
    """The corpus split tokenized by a transformers tokenizer. Each token's byte count comes from
    :func:`common.data.token_byte_lengths` for a byte-level BPE (exact), else from the UTF-8 length of
    its decoded text (close for SentencePiece vocabularies, whose byte pieces decode to U+FFFD)."""
    train_chunks, val_chunks = split_text(load_corpus())

    def encode(chunks: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for row in tokenizer(chunks, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if eot is not None:
                ids.append(eot)
        return torch.tensor(ids, dtype=torch.long)

    n = max(model_vocab, len(tokenizer))
    token_bytes = torch.zeros(n, dtype=torch.long)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        lengths = token_byte_lengths(backend)  # one character per byte: exact
        token_bytes[: len(lengths)] = lengths
    else:
        specials = set(tokenizer.all_special_ids)
        for i in range(len(tokenizer)):
            if i not in specials:
                token_bytes[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return TokenData(encode(train_chunks), encode(val_chunks), context_length, token_bytes, n)


def load_pretrained(name: str, device: str = "cpu") -> LMSource:
    """An :class:`LMSource` of the project's own trained LM ``name`` ("tiny" or "test")."""
    from common.pretrained import pretrained_lm

    model, tokenizer, info = pretrained_lm(name, device=device)
    data = TokenData.from_text(load_corpus(), tokenizer, context_length=model.config.context_length)
    return LMSource(
        model,
        data,
        "pretrained",
        f"pretrained_lm({name!r})",
        lambda text: tokenizer.encode(text).ids,
        lambda ids: tokenizer.decode(ids),
        tokenizer.token_to_id(EOT),
        info,
        tokenizer,
    )


def load_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LMSource:
    """The model the flags of :func:`add_source_args` name; a bad ``--hf-path`` ends in ``parser.error``."""
    if args.hf_path is not None:
        if args.model is not None:
            parser.error("give either --model or --hf-path, not both")
        problem = hf_folder_problem(args.hf_path)
        if problem:
            parser.error(problem)
        try:
            return load_hf_folder(args.hf_path, args.device)
        except ValueError as e:
            parser.error(str(e))
    return load_pretrained(args.model or ("test" if args.quick else "tiny"), args.device)


def load_decoder(parser: argparse.ArgumentParser, args: argparse.Namespace, purpose: str):
    """``(source, model)``: the model the flags name, as a DecoderLM for ``purpose``; a folder of another
    architecture (GPT-2...) is a one-line ``parser.error``, as a bad ``--hf-path`` is."""
    source = load_source(parser, args)
    try:
        return source, source.decoder(purpose)
    except ValueError as e:
        parser.error(str(e))


def load_for_compression(
    parser: argparse.ArgumentParser, args: argparse.Namespace, purpose: str, bits: tuple[int, ...] = ()
):
    """The compression scripts' start: ``(source, model, windows)``, the model the flags name (as a
    DecoderLM for ``purpose``), checked against every bit width in ``bits`` at ``args.group_size``, and
    ``args.calib_samples`` calibration windows of its training split; a flag that cannot work ends in a
    one-line ``parser.error`` before any work starts."""
    from common.calibration import calibration_windows
    from common.quant import check_model_spec

    source, model = load_decoder(parser, args, purpose)
    try:
        for b in bits:
            check_model_spec(model, b, args.group_size)
        windows = calibration_windows(source.data.train, args.calib_samples, model.config.context_length)
    except ValueError as e:
        parser.error(str(e))
    print(f"model: {source.describe()}; calibration: {tuple(windows.shape)} windows of the training split")
    return source, model, windows


def save_hf_folder(model, encode_tokenizer, path: str) -> str:
    """Write a DecoderLM and its ``tokenizers.Tokenizer`` as a Hugging Face folder (Llama weights,
    ``tokenizer.json``) that :func:`load_hf_folder` and transformers' ``from_pretrained`` read back."""
    from transformers import PreTrainedTokenizerFast

    from common.models.hf_llama import decoder_to_hf

    decoder_to_hf(model).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=encode_tokenizer, eos_token=EOT).save_pretrained(path)
    return path


def evaluate_lm(
    model: nn.Module, data: TokenData, batch_size: int = 8, max_batches: int | None = None, device=None
) -> dict:
    """Held-out ``loss`` (nats per token), ``ppl`` (its exponential) and ``bpb`` (bits per byte) over the
    fixed validation windows of ``data`` (:func:`common.training.evaluate`, fp32)."""
    from common.training import evaluate

    device = device or next(model.parameters()).device
    result = evaluate(model, data, batch_size, max_batches, str(device))
    return {**result, "ppl": math.exp(result["loss"])}
