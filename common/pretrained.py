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
``model.safetensors`` and ``info.json`` (figures, config, and the SHA-256 of the weights); a missing,
truncated or edited file fails the check and the model is retrained, never trusted.  An interrupted
first training resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from common import checkpoint as ckpt
from common.data import TokenData, atomic_write_bytes, cache_dir, corpus_hash, get_tokenizer, load_corpus

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


def _load(folder: Path, name: str, device: str):
    """(model, info) from ``folder``, or None when anything is missing or fails its checksum."""
    from safetensors.torch import load_model

    weights, info_path = folder / ckpt.WEIGHTS, folder / "info.json"
    try:
        info = json.loads(info_path.read_text())
        if ckpt.file_sha256(weights) != info["weights_sha256"]:
            return None
        model = _build(name)
        load_model(model, str(weights), strict=True, device=str(device))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    return model.to(device).eval(), info


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
    from common.training import TrainConfig, train

    text = load_corpus()
    key = spec_key(name, text)
    spec = SPECS[name]
    tokenizer = get_tokenizer(spec["vocab_size"], text=text, cache=cache)
    folder = cache_dir(cache) / f"pretrained-{name}-{key}"
    if not retrain:
        loaded = _load(folder, name, device)
        if loaded is not None:
            model, info = loaded
            return model, tokenizer, {**info, "cached": True}
        if (folder / ckpt.WEIGHTS).exists() or (folder / "info.json").exists():
            print(f"pretrained_lm({name!r}): cache in {folder} is incomplete or corrupt; retraining")
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
    cfg = TrainConfig(
        **spec["train"],
        seed=spec["seed"],
        ckpt_dir=str(ckpt_dir),
        ckpt_every=100,
        resume=not retrain,
        progress=progress,
    )
    start = time.perf_counter()
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
    os.replace(tmp, folder / ckpt.WEIGHTS)
    atomic_write_bytes(folder / "info.json", json.dumps(info, indent=2).encode())
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return model.eval(), tokenizer, {**info, "cached": False}
