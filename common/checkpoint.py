"""Checkpoints that resume a training run exactly.

A checkpoint is a folder with two files:

- ``model-<sha>.safetensors``: the weights (safetensors: no pickle, shared/tied tensors handled),
  named after the first 16 hex digits of their SHA-256;
- ``state.pt``: the step, the optimizer state, every random number generator (Python, NumPy,
  torch CPU and CUDA, plus any extra ``torch.Generator``), the run's history, the name of its
  weights file and their full SHA-256.  It holds only tensors and plain Python values, so it loads
  with ``torch.load(..., weights_only=True)`` (no arbitrary code runs on load).

Saving writes the new weights file beside the old one, then the new ``state.pt`` to a temporary
name, and renames it over the old ``state.pt`` (``os.replace`` is atomic): that one rename switches
from the old checkpoint to the new.  Only then are the old weights removed.  A crash or a signal
at any instant therefore leaves ``state.pt`` naming a complete weights file, old or new; the files
it left half-written (temporaries, unreferenced weights) are removed by the next save or load.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import psutil
import torch

WEIGHTS = "model.safetensors"  # the weights of a checkpoint written before they were content-named
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


def _weights_name(state: dict) -> str:
    return state.get("weights_file", WEIGHTS)


def _current_state(directory: Path) -> dict | None:
    try:
        return torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, truncated, not a torch file
        return None


def _tidy(directory: Path, keep: str | None) -> None:
    """Remove what an interrupted save left: this process's temporaries and those of processes that
    have ended (never a live one's: it may be writing them now), and weights that ``state.pt`` does not
    name."""
    for path in directory.iterdir():
        stray_weights = path.name.startswith("model") and path.name.endswith(".safetensors")
        _, tmp, pid = path.name.rpartition(".tmp")
        ours_or_dead = tmp and (
            not pid.isdigit() or int(pid) == os.getpid() or not psutil.pid_exists(int(pid))
        )
        if ours_or_dead or (stray_weights and path.name != keep):
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    the step being resumed when saving after an interruption.  The previous checkpoint in
    ``directory`` stays loadable until the new one is complete (see the module docstring).
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = directory / f"{WEIGHTS}.tmp{os.getpid()}"
    save_model(model, str(tmp_weights))
    _fsync(tmp_weights)
    sha = file_sha256(tmp_weights)
    weights_file = f"model-{sha[:16]}.safetensors"
    os.replace(tmp_weights, directory / weights_file)  # a new name: the old checkpoint is untouched
    state = {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state if rng_state is not None else capture_rng_state(),
        "extra": extra or {},
        "weights_file": weights_file,
        "weights_sha256": sha,
    }
    tmp_state = directory / f"{STATE}.tmp{os.getpid()}"
    torch.save(state, tmp_state)
    _fsync(tmp_state)
    os.replace(tmp_state, directory / STATE)  # the switch from the old checkpoint to the new
    _tidy(directory, keep=weights_file)
    return directory


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    """True when ``directory`` holds a ``state.pt`` and the weights file it names."""
    if directory is None or not (Path(directory) / STATE).is_file():
        return False
    state = _current_state(Path(directory))
    return state is not None and (Path(directory) / _weights_name(state)).is_file()


def load_checkpoint(
    directory: str | os.PathLike, model: torch.nn.Module, optimizer=None, device: str | torch.device = "cpu"
) -> dict:
    """Load weights (and optimizer state) from ``directory`` into ``model``; return the state dict.

    The caller restores the RNGs with :func:`restore_rng_state` (``state["rng"]``) when resuming.
    Raises :class:`CheckpointError` on a missing file, an unreadable file or a checksum mismatch.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / STATE).is_file():
        raise CheckpointError(f"no checkpoint in {directory} (no {STATE})")
    try:
        state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise CheckpointError(f"{directory / STATE} is unreadable: {type(e).__name__}: {e}") from e
    weights = directory / _weights_name(state)
    if not weights.is_file():
        raise CheckpointError(f"{weights}, named by {directory / STATE}, is missing")
    if file_sha256(weights) != state.get("weights_sha256"):
        raise CheckpointError(
            f"{weights} does not match the checksum in {STATE} (interrupted write or edited file)"
        )
    _tidy(directory, keep=weights.name)
    load_model(model, str(weights), strict=True, device=str(device))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{directory} holds no optimizer state to resume from")
        optimizer.load_state_dict(state["optimizer"])
    return state


def read_state(directory: str | os.PathLike) -> dict:
    """``state.pt`` of the checkpoint in ``directory`` (step, config, history) without loading weights."""
    state = _current_state(Path(directory))
    if state is None:
        raise CheckpointError(f"no readable {STATE} in {directory}")
    return state
