"""Every section script runs in quick mode on the CPU, as `python -m verify --quick` runs it.

A script may skip (exit 77) only for what this CPU machine cannot have: a GPU, or a GPU-only package
of requirements-gpu.txt; it then shows up as a pytest skip with the script's own reason.  A skip for
any other reason (a core package that does not import, a bad flag) fails here.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from common.runner import SKIP_EXIT_CODE
from tests.conftest import REPO_ROOT
from verify.harness import discover

SCRIPTS = discover(REPO_ROOT)
GPU_ONLY = re.compile(r"GPU|CUDA|auto-gptq|auto_gptq|autoawq|awq|tensorrt|fastmoe|fmoe", re.IGNORECASE)


def test_the_book_has_scripts():
    assert "ch04_transformer_moe/s4_1_0_environment.py" in SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS)
def test_script_quick(path, tmp_path):
    module = path[:-3].replace("/", ".")
    fig = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BOOK_QUICK": "1", "MPLBACKEND": "Agg"}
    out = tmp_path / "out"  # plots and checkpoints go here, not into the checkout
    cmd = [sys.executable, "-m", module, "--quick", "--device", "cpu", "--json", str(fig), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    payload = json.loads(fig.read_text()) if fig.exists() else {}
    if proc.returncode == SKIP_EXIT_CODE:
        reason = payload.get("reason", "")
        assert GPU_ONLY.search(reason), f"{path} skipped on the CPU for a reason that holds here: {reason!r}"
        pytest.skip(f"{path}: {reason}")
    assert proc.returncode == 0, f"{path} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert payload["status"] == "PASS" and payload["figures"], payload
