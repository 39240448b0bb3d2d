"""Test-only alias: ``import fmoe`` gives :mod:`common.fmoe` and ``fmoe.X`` gives ``common.fmoe.X``,
the very same module objects (so ``issubclass(MyGate, fmoe.gates.NaiveGate)`` holds for our FMoE).

Only fastmoe's ported tests put this folder on ``sys.path`` (``tests/fastmoe/conftest.py``, and
``PYTHONPATH`` for their worker processes); nothing else in the repository imports ``fmoe``.
"""

import importlib
import pkgutil
import sys

import common.fmoe as _ours

for _info in pkgutil.walk_packages(_ours.__path__, "common.fmoe."):
    sys.modules["fmoe" + _info.name[len("common.fmoe") :]] = importlib.import_module(_info.name)
sys.modules[__name__] = _ours
