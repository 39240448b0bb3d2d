"""Checkpoints that resume a training run exactly.

A checkpoint is a folder with two files:

- ``model.safetensors``: the weights (safetensors: no pickle, shared/tied tensors handled);
- ``state.pt``: the step, the optimizer state, every random number generator (Python, NumPy,
  torch CPU and CUDA, plus any extra ``torch.Generator``), the run's history, and the SHA-256 of
  the weights file.  It holds only tensors and plain Python values, so it loads with
  ``torch.load(..., weights_only=True)`` (no arbitrary code runs on load).

Each file is written to a temporary name and renamed over the old one (``os.replace`` is atomic),
weights first.  A crash between the two renames leaves new weights with the old state: the
checksum in ``state.pt`` then no longer matches and :func:`load_checkpoint` refuses the pair.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
STATE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match its checksum."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG a training step may draw from, as tensors and plain values."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        g.set_state(state["generators"][name])


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer=None,
    step: int = 0,
    rng_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``model`` weights and the training state into ``directory`` atomically; return the folder.

    ``rng_state`` defaults to the generators' state now; pass the state captured at the start of
    the step being resumed when saving after an interruption.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, state_path = directory / WEIGHTS, directory / STATE
    tmp_weights = directory / f"{WEIGHTS}.tmp{os.getpid()}"
    save_model(model, str(tmp_weights))
    state = {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state if rng_state is not None else capture_rng_state(),
        "extra": extra or {},
        "weights_sha256": file_sha256(tmp_weights),
    }
    tmp_state = directory / f"{STATE}.tmp{os.getpid()}"
    torch.save(state, tmp_state)
    os.replace(tmp_weights, weights)
    os.replace(tmp_state, state_path)
    return directory


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    return (
        directory is not None
        and (Path(directory) / STATE).is_file()
        and (Path(directory) / WEIGHTS).is_file()
    )


def load_checkpoint(
    directory: str | os.PathLike, model: torch.nn.Module, optimizer=None, device: str | torch.device = "cpu"
) -> dict:
    """Load weights (and optimizer state) from ``directory`` into ``model``; return the state dict.

    The caller restores the RNGs with :func:`restore_rng_state` (``state["rng"]``) when resuming.
    Raises :class:`CheckpointError` on a missing file, an unreadable file or a checksum mismatch.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    if not has_checkpoint(directory):
        raise CheckpointError(f"no complete checkpoint in {directory} (need {WEIGHTS} and {STATE})")
    try:
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise CheckpointError(f"{directory / STATE} is unreadable: {type(e).__name__}: {e}") from e
    if file_sha256(directory / WEIGHTS) != state.get("weights_sha256"):
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match the checksum in {STATE} (interrupted write or edited file)"
        )
    load_model(model, str(directory / WEIGHTS), strict=True, device=str(device))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{directory} holds no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    return state
