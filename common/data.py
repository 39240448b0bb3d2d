"""Text data for the language models: the embedded corpus, the BPE tokenizer and batching.

Nothing here downloads anything.  The default corpus is real English prose that ships with
Python itself: the reference-manual topics of ``pydoc_data.topics`` (what ``help("if")`` prints)
followed by the docstrings of a fixed list of standard-library modules, read from their source
files with :mod:`ast` (nothing is imported or executed).  It is deterministic for a given Python
version, about 1 MB.

    text = load_corpus()                          # or load_corpus("my_book.txt")
    tok = get_tokenizer(vocab_size=2048)          # byte-level BPE, trained once, cached in .cache/
    data = TokenData.from_text(text, tok, context_length=128)
    x, y = data.get_batch("train", batch_size=8, generator=g)   # (8, 128) each, y = x shifted by one
    for x, y in data.val_batches(batch_size=8): ...              # fixed order, same every call

The split is by chunks of whole paragraphs (about 4 KB each; a paragraph over twice that, such
as a long text without blank lines, is cut by size at line breaks or spaces): every
``round(1 / val_fraction)``-th chunk goes to validation, so both splits cover the whole corpus and
the split never changes.  A corpus file that is missing, a folder, empty, binary or not UTF-8 is
refused with a one-line :class:`~common.errors.UsageError` naming the file.
``data.bytes_per_token`` and the per-token byte counts ``data.token_bytes`` turn a loss in nats
per token into bits per byte, a figure comparable across tokenizers.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "BOOK_CACHE_DIR"
EOT = "<|endoftext|>"

# Standard-library modules whose docstrings join the corpus, in this order.  Missing ones (the
# stdlib changes between Python versions) are skipped, so the corpus stays deterministic per version.
STDLIB_MODULES = (
    "abc",
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest/case",
    "urllib/parse",
    "zipfile",
)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where trained tokenizers and models live: ``override``, ``$BOOK_CACHE_DIR``, ``<repo>/.cache``."""
    path = Path(override or os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temporary file next to ``path`` and rename it over, so no reader sees half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the corpus


def module_docstrings(relpath: str) -> str | None:
    """The docstrings (80 characters or more) of the standard-library module at ``relpath`` ("json",
    "email/message"), joined by blank lines; None when this Python has no such module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for candidate in (stdlib / f"{relpath}.py", stdlib / relpath / "__init__.py"):
        if candidate.is_file():
            tree = ast.parse(candidate.read_text(encoding="utf-8"))
            break
    else:
        return None
    docs = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 80 and doc not in docs:  # skip one-liners and repeats
                docs.append(doc)
    return "\n\n".join(docs)


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """The text to train on: the file at ``path`` (UTF-8), or the embedded default corpus.

    Raises :class:`~common.errors.UsageError` naming the file when it is missing, a folder,
    unreadable, empty, binary (it holds NUL bytes) or not valid UTF-8.
    """
    if path is None:
        return _default_corpus()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"corpus file {path}: no such file")
    if path.is_dir():
        raise UsageError(f"corpus file {path} is a folder, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"corpus file {path} cannot be read: {e.strerror or e}") from e
    if b"\x00" in raw:
        raise UsageError(f"corpus file {path} is binary (it holds NUL bytes), not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"corpus file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    if not text.strip():
        raise UsageError(f"corpus file {path} is empty")
    return text


@functools.lru_cache(maxsize=1)
def _default_corpus() -> str:
    from pydoc_data.topics import topics

    documents = [topics[key].strip() for key in sorted(topics)]
    for name in STDLIB_MODULES:
        docs = module_docstrings(name)
        if docs:
            documents.append(docs)
    return "\n\n".join(documents) + "\n"


def corpus_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split_text(text: str, val_fraction: float = 0.1, chunk_chars: int = 4096) -> tuple[list[str], list[str]]:
    """Split ``text`` into (train chunks, validation chunks) of whole paragraphs, deterministically.

    Paragraphs (separated by blank lines) are packed into chunks of about ``chunk_chars``
    characters, a paragraph longer than ``2 * chunk_chars`` first cut into pieces of about
    ``chunk_chars`` (:func:`_cut_by_size`); every ``round(1 / val_fraction)``-th chunk goes to validation.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    chunks, current = [], ""
    for paragraph in text.split("\n\n"):
        pieces = _cut_by_size(paragraph, chunk_chars)
        if len(pieces) > 1:  # a paragraph cut by size: its pieces are chunks of their own
            chunks += [current] if current else []
            chunks += pieces
            current = ""
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= chunk_chars:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    every = round(1 / val_fraction)
    if len(chunks) < every:
        raise UsageError(
            f"text too short to split: {len(chunks)} chunks of ~{chunk_chars} characters, "
            f"need at least {every} for val_fraction={val_fraction}"
        )
    train = [c for i, c in enumerate(chunks) if i % every != every - 1]
    val = [c for i, c in enumerate(chunks) if i % every == every - 1]
    return train, val


def _cut_by_size(paragraph: str, size: int) -> list[str]:
    """``paragraph`` whole, or, when longer than ``2 * size``, cut into pieces of at most ``size``
    characters, each ending with a line break (else a space) where one lies in its second half."""
    if len(paragraph) <= 2 * size:
        return [paragraph]
    pieces, rest = [], paragraph
    while len(rest) > size:
        at = rest.rfind("\n", size // 2, size)
        at = at if at >= 0 else rest.rfind(" ", size // 2, size)
        cut = at + 1 if at >= 0 else size
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return [*pieces, rest] if rest else pieces


# ----------------------------------------------------------------------------- the tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _load_cached_tokenizer(path: Path):
    """The cached tokenizer, or None when the file is missing or fails its checksum."""
    from tokenizers import Tokenizer

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        body = record["tokenizer"]
        if hashlib.sha256(body.encode("utf-8")).hexdigest() != record["sha256"]:
            return None
        return Tokenizer.from_str(body)
    except (OSError, ValueError, KeyError, TypeError, Exception):  # noqa: B014 - tokenizers raises Exception
        return None


def get_tokenizer(vocab_size: int = 2048, text: str | None = None, cache: str | os.PathLike | None = None):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` tokens (``<|endoftext|>`` included).

    Trained on the training split of ``text`` (default: the embedded corpus) the first time, then
    loaded from ``<cache>/tokenizer-<corpus hash>-<vocab>.json``.  The file carries a SHA-256 of
    its content; a corrupt or truncated file is retrained and rewritten, never trusted.
    """
    text = load_corpus() if text is None else text
    path = cache_dir(cache) / f"tokenizer-{corpus_hash(text)}-{vocab_size}.json"
    tokenizer = _load_cached_tokenizer(path) if path.exists() else None
    if tokenizer is None:
        train_chunks, _ = split_text(text)
        tokenizer = train_tokenizer(train_chunks, vocab_size)
        body = tokenizer.to_str()
        record = {"sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(), "tokenizer": body}
        atomic_write_bytes(path, json.dumps(record).encode("utf-8"))
    return tokenizer


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(vocab,) int64: how many UTF-8 bytes each token stands for (0 for special tokens).

    A byte-level BPE token is a string of GPT-2's 256 printable stand-ins, one character per byte,
    so its length is its byte count.
    """
    specials = set(tokenizer.get_added_tokens_decoder())
    lengths = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for token, idx in tokenizer.get_vocab().items():
        if idx not in specials:
            lengths[idx] = len(token)
    return lengths


# ----------------------------------------------------------------------------- tokens and batches


@dataclass
class TokenData:
    """Token streams for training and validation, with what is needed to batch them and to compute bpb.

    ``train`` and ``val`` are 1-D int64 tensors: the chunks of each split encoded and joined with
    ``<|endoftext|>``.  ``token_bytes[i]`` is the number of bytes token ``i`` decodes to.
    """

    train: torch.Tensor
    val: torch.Tensor
    context_length: int
    token_bytes: torch.Tensor
    vocab_size: int

    @classmethod
    def from_text(cls, text: str, tokenizer, context_length: int, val_fraction: float = 0.1) -> TokenData:
        train_chunks, val_chunks = split_text(text, val_fraction)
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT} token")

        def encode(chunks: list[str]) -> torch.Tensor:
            ids: list[int] = []
            for enc in tokenizer.encode_batch(chunks, add_special_tokens=False):
                ids.extend(enc.ids)
                ids.append(eot)
            return torch.tensor(ids, dtype=torch.long)

        data = cls(
            encode(train_chunks),
            encode(val_chunks),
            context_length,
            token_byte_lengths(tokenizer),
            tokenizer.get_vocab_size(),
        )
        for split in ("train", "val"):
            if len(data.tokens(split)) <= context_length:
                raise UsageError(
                    f"{split} split has {len(data.tokens(split))} tokens, not more than "
                    f"context_length={context_length}: use a longer text or a shorter context"
                )
        return data

    def tokens(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    @property
    def bytes_per_token(self) -> dict[str, float]:
        """Average UTF-8 bytes per token of each split."""
        return {
            s: self.token_bytes[self.tokens(s)].sum().item() / len(self.tokens(s)) for s in ("train", "val")
        }

    def get_batch(
        self, split: str, batch_size: int, generator: torch.Generator | None = None, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (batch, context) and y = x shifted left by one token.

        ``rows`` takes a slice of the sampled batch: data-parallel ranks draw the same global batch
        (same generator state) and each keeps its own rows, so N ranks see exactly what one
        process with N times the batch sees.
        """
        tokens = self.tokens(split)
        T = self.context_length
        starts = torch.randint(0, len(tokens) - T, (batch_size,), generator=generator)
        if rows is not None:
            starts = starts[rows]
        offsets = torch.arange(T + 1)
        windows = tokens[starts[:, None] + offsets]  # (batch, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def val_batches(self, batch_size: int, max_batches: int | None = None):
        """Non-overlapping validation windows from the start, in fixed order: (x, y) of (batch, context)."""
        tokens, T = self.val, self.context_length
        n_windows = (len(tokens) - 1) // T
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)
        for first in range(0, n_windows, batch_size):
            starts = torch.arange(first, min(first + batch_size, n_windows)) * T
            windows = tokens[starts[:, None] + torch.arange(T + 1)]  # (batch, T + 1)
            yield windows[:, :-1], windows[:, 1:]


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Cross-entropy summed over predicted tokens (nats) divided by the bytes they encode, in bits."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, got {total_bytes}")
    return total_nats / (math.log(2) * total_bytes)
