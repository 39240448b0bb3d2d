#!/usr/bin/env python3
"""Set up and run the book on a fresh machine; needs only Python 3.10+ (standard library).

    python3 run.py book [VERIFY FLAGS]   # set up, then run every section script in quick mode
    python3 run.py book --full --device cuda    # the book's full sizes, on the GPU
    python3 run.py test [PYTEST FLAGS]   # set up, then run the tests
    python3 run.py setup                 # only install what the book needs

Set-up installs into the Python that runs this file (use a virtual environment if you like):
torch first, deliberately (TORCH, default torch==2.13.0, and only when torch is missing), then
requirements.txt, then this repository in editable mode so that scripts also run by path. It is
skipped when nothing changed since the last successful set-up.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAMP = ROOT / ".cache" / "setup.stamp"
TORCH = os.environ.get("TORCH", "torch==2.13.0")


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def setup() -> None:
    digest = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("requirements.txt", "pyproject.toml"))
        + sys.executable.encode()
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0:
        sh(*pip, TORCH)
    sh(*pip, "-r", "requirements.txt")
    sh(*pip, "--no-deps", "-e", ".")
    STAMP.parent.mkdir(exist_ok=True)
    STAMP.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"book", "test", "setup"}:
        print(__doc__)
        return 2
    setup()
    env = {**os.environ, "MPLBACKEND": os.environ.get("MPLBACKEND", "Agg")}
    if argv[0] == "book":
        flags = [f for f in argv[1:] if f != "--full"]
        if "--full" not in argv:
            flags.insert(0, "--quick")
        return subprocess.run([sys.executable, "-m", "verify", *flags], cwd=ROOT, env=env).returncode
    if argv[0] == "test":
        code = subprocess.run([sys.executable, "-m", "pytest", *argv[1:]], cwd=ROOT, env=env).returncode
        return 0 if code == 5 else code  # 5: no tests collected (e.g. a -k that matches nothing)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
