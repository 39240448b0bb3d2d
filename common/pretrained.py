"""The small pretrained language model the later chapters use (4.3 and 7 compress it).

    from common.pretrained import pretrained_lm
    model, tokenizer, info = pretrained_lm("tiny")      # trains on first use (a few minutes), then cached
    print(info["val_loss"], info["val_bpb"], info["params"])

A Llama-style :class:`~common.models.decoder.DecoderLM` (RMSNorm, RoPE, SwiGLU, pre-norm, no biases)
trained with :func:`common.training.train` on the embedded corpus (:func:`common.data.load_corpus`),
with the byte-level BPE tokenizer of :func:`common.data.get_tokenizer`.  Names:

- ``"tiny"``: the book's model, about a million parameters, a few minutes on 2 CPU cores;
- ``"test"``: a much smaller one that trains in seconds, for tests and ``--quick`` runs.

The result is cached in ``<cache>/pretrained-<name>-<key>/`` where the key hashes the model config,
the training settings and the corpus, so changing any of them trains a new model.  The folder holds
``model.safetensors`` and ``info.json`` (figures, config, the SHA-256 of the weights, and
``info_sha256``, the SHA-256 of the rest of ``info.json`` itself); a missing, truncated or edited
file, or an ``info.json`` that lacks a field, fails the check and the model is retrained, never
trusted.  An interrupted first training resumes from its checkpoint (one that no longer fits is
set aside and training starts afresh).  Two processes that need the model at once do not both train
it: the first holds a lock (``pretrained-<name>-<key>.lock`` beside the folder, ``fcntl.flock``)
while it trains, the other waits and then loads what the first cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from common import checkpoint as ckpt
from common.data import TokenData, atomic_write_bytes, cache_dir, corpus_hash, get_tokenizer, load_corpus
from common.errors import UsageError

# Bump when the training code changes in a way that changes the weights.
RECIPE_VERSION = 1

# Llama-style: what ``to_hf`` can express, so later chapters may hand the model to transformers too
_ARCH = dict(norm="rmsnorm", pos="rope", ffn="swiglu", tie_embeddings=False, bias=False, dropout=0.0)
_SCHEDULE = dict(grad_accum=1, lr=4e-3, muon_lr=0.02, warmdown_frac=0.4, grad_clip=1.0)

SPECS = {
    "tiny": {
        "vocab_size": 2048,
        "model": dict(context_length=128, n_layer=4, d_model=128, n_head=4, n_kv_head=4, **_ARCH),
        "train": dict(
            steps=160,
            batch_size=32,
            warmup_steps=10,
            eval_every=40,
            eval_batches=16,
            dtype="auto",
            **_SCHEDULE,
        ),
        "seed": 0,
    },
    "test": {
        "vocab_size": 512,
        "model": dict(context_length=64, n_layer=2, d_model=64, n_head=2, n_kv_head=2, **_ARCH),
        "train": dict(
            steps=30, batch_size=8, warmup_steps=3, eval_every=0, eval_batches=4, dtype="fp32", **_SCHEDULE
        ),
        "seed": 0,
    },
}


def spec_key(name: str, text: str) -> str:
    """Hash of everything that decides the weights: the spec, the corpus, the recipe version."""
    if name not in SPECS:
        raise ValueError(f"unknown pretrained model {name!r}; choose one of {', '.join(SPECS)}")
    payload = json.dumps(
        {"spec": SPECS[name], "corpus": corpus_hash(text), "recipe": RECIPE_VERSION}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _build(name: str):
    from common.models.decoder import DecoderConfig, DecoderLM

    spec = SPECS[name]
    return DecoderLM(DecoderConfig(vocab_size=spec["vocab_size"], **spec["model"]))


INFO = "info.json"
# what info.json must hold, with its type, besides the two checksums
INFO_FIELDS = {
    "name": str,
    "key": str,
    "val_loss": float,
    "val_bpb": float,
    "params": int,
    "steps": int,
    "seconds": float,
    "tokens_per_second": float,
    "train_tokens": int,
    "config": dict,
    "train": dict,
}


def _info_digest(info: dict) -> str:
    """SHA-256 of ``info`` without its own checksum, over a canonical JSON text."""
    body = {k: v for k, v in info.items() if k != "info_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _load(folder: Path, name: str, key: str, device: str):
    """(model, info) from ``folder``, or None when anything is missing, incomplete or fails a checksum."""
    from safetensors.torch import load_model

    weights, info_path = folder / ckpt.WEIGHTS, folder / INFO
    try:
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict) or info.get("info_sha256") != _info_digest(info):
            return None
        if any(not isinstance(info.get(f), t) for f, t in INFO_FIELDS.items()):
            return None
        if (info["name"], info["key"]) != (name, key) or ckpt.file_sha256(weights) != info["weights_sha256"]:
            return None
        model = _build(name)
        load_model(model, str(weights), strict=True, device=str(device))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    return model.to(device).eval(), info


@contextlib.contextmanager
def _training_lock(path: Path, name: str, progress: bool):
    """Hold an exclusive lock on ``path`` (waiting, with a word, while another process holds it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; two first uses may both train (each result is valid)
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"pretrained_lm({name!r}): another process is training it; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pretrained_lm(
    name: str = "tiny",
    device: str = "cpu",
    retrain: bool = False,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
):
    """``(model, tokenizer, info)``: the named small LM, trained on first use and then loaded from the cache.

    ``info`` holds ``val_loss`` (nats per token), ``val_bpb`` (bits per byte), ``params``, ``steps``,
    ``seconds`` (training time), ``tokens_per_second``, ``config``, ``cached`` (loaded, not trained now).
    """
    text = load_corpus()
    key = spec_key(name, text)
    spec = SPECS[name]
    tokenizer = get_tokenizer(spec["vocab_size"], text=text, cache=cache)
    folder = cache_dir(cache) / f"pretrained-{name}-{key}"
    if not retrain:
        loaded = _load(folder, name, key, device)
        if loaded is not None:
            model, info = loaded
            return model, tokenizer, {**info, "cached": True}
    with _training_lock(folder.with_name(f"{folder.name}.lock"), name, progress):
        if not retrain:
            loaded = _load(folder, name, key, device)  # another process may have trained it meanwhile
            if loaded is not None:
                model, info = loaded
                return model, tokenizer, {**info, "cached": True}
            if (folder / ckpt.WEIGHTS).exists() or (folder / INFO).exists():
                print(f"pretrained_lm({name!r}): cache in {folder} is incomplete or corrupt; retraining")
        return _train_and_cache(name, key, folder, text, tokenizer, device, retrain, progress)


def _train_and_cache(
    name, key, folder: Path, text: str, tokenizer, device: str, retrain: bool, progress: bool
):
    """Train the named model (resuming an interrupted first training), write it to ``folder``, return it."""
    from common.training import TrainConfig, train

    spec = SPECS[name]
    folder.mkdir(parents=True, exist_ok=True)
    data = TokenData.from_text(text, tokenizer, context_length=spec["model"]["context_length"])
    torch.manual_seed(spec["seed"])
    model = _build(name)
    if progress:
        print(
            f"pretrained_lm({name!r}): training a {model.num_params():,}-parameter decoder LM on "
            f"{len(data.train):,} tokens (first use; cached in {folder})"
        )
    ckpt_dir = folder / "train-checkpoint"
    resume = not retrain and ckpt.has_checkpoint(ckpt_dir)
    cfg = TrainConfig(
        **spec["train"],
        seed=spec["seed"],
        ckpt_dir=str(ckpt_dir),
        ckpt_every=100,
        resume=resume,
        progress=progress,
    )
    start = time.perf_counter()
    try:
        result = train(model, data, cfg, device=device)
    except UsageError as e:  # a checkpoint of an earlier recipe, or a damaged one: start afresh
        print(f"pretrained_lm({name!r}): {e}; training from the start")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        torch.manual_seed(spec["seed"])
        model = _build(name)
        cfg.resume = False
        result = train(model, data, cfg, device=device)
    info = {
        "name": name,
        "val_loss": result["val_loss"],
        "val_bpb": result["val_bpb"],
        "params": model.num_params(),
        "steps": result["steps"],
        "seconds": time.perf_counter() - start,
        "tokens_per_second": result["tokens_per_second"],
        "train_tokens": len(data.train),
        "config": model.config.to_dict(),
        "train": spec["train"],
        "key": key,
    }
    tmp = folder / f"{ckpt.WEIGHTS}.tmp{os.getpid()}"
    from safetensors.torch import save_model

    save_model(model, str(tmp))
    info["weights_sha256"] = ckpt.file_sha256(tmp)
    info["info_sha256"] = _info_digest(info)
    os.replace(tmp, folder / ckpt.WEIGHTS)
    atomic_write_bytes(folder / INFO, json.dumps(info, indent=2).encode())
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return model.eval(), tokenizer, {**info, "cached": False}
