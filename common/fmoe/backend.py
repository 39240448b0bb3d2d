"""Which fastmoe a script runs: the real ``fmoe`` where it imports (built from source against CUDA
and NCCL), else :mod:`common.fmoe`, the pure-PyTorch implementation of the same API.

``from common.fmoe import FMoETransformerMLP`` is always ours (tests stay deterministic); a script
that wants the real one where it exists calls :func:`fmoe_backend` and says which one ran.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def fmoe_backend(prefer_real: bool = True) -> tuple[ModuleType, str]:
    """``(module, description)``: the real ``fmoe`` if it imports and ``prefer_real``, else ours."""
    if prefer_real:
        try:
            real = importlib.import_module("fmoe")
            if real.__name__ != "common.fmoe":  # fastmoe's ported tests alias ours as fmoe
                return (
                    real,
                    f"fastmoe {getattr(real, '__version__', '(version unknown)')} (the real fmoe, CUDA)",
                )
            reason = "the fmoe that imports is common.fmoe itself (a test alias)"
        except Exception as e:  # noqa: BLE001 - any failure to import means: use ours
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
    else:
        reason = "asked for"
    ours = importlib.import_module("common.fmoe")
    return ours, f"common.fmoe (pure PyTorch, fastmoe's API; real fmoe not used: {reason})"
