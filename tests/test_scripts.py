"""Every section script runs in quick mode on the CPU, as `python -m verify --quick` runs it.

A script that skips (exit 77) shows up here as a pytest skip carrying the script's own reason.
"""

import json
import os
import subprocess
import sys

import pytest

from common.runner import SKIP_EXIT_CODE
from tests.conftest import REPO_ROOT
from verify.harness import discover

SCRIPTS = discover(REPO_ROOT)


def test_the_book_has_scripts():
    assert "ch04_transformer_moe/s4_1_0_environment.py" in SCRIPTS


@pytest.mark.parametrize("path", SCRIPTS)
def test_script_quick(path, tmp_path):
    module = path[:-3].replace("/", ".")
    fig = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BOOK_QUICK": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", module, "--quick", "--device", "cpu", "--json", str(fig)]
    if _takes_out(path):
        cmd += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    payload = json.loads(fig.read_text()) if fig.exists() else {}
    if proc.returncode == SKIP_EXIT_CODE:
        pytest.skip(f"{path}: {payload.get('reason', 'skipped')}")
    assert proc.returncode == 0, f"{path} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert payload["status"] == "PASS" and payload["figures"], payload


def _takes_out(path: str) -> bool:
    """Scripts with an --out flag write their plots to a temporary folder, not into the checkout."""
    return "--out" in (REPO_ROOT / path).read_text()
