#!/usr/bin/env python3
"""Set up and run the book on a fresh machine; needs only Python 3.10+ (standard library). Start it
as ``python3 run.py``, ``python run.py`` or, on Windows, ``py run.py``: it installs into and runs with
the Python that started it.

    python3 run.py book [VERIFY FLAGS]   # set up, then run every section script in quick mode
    python3 run.py book --full --device cuda    # the book's full sizes, on the GPU
    python3 run.py test [PYTEST FLAGS]   # set up, then run the tests
    python3 run.py setup                 # only install what the book needs
    python3 run.py book --help           # the harness's own flags (--only, --compare, --timeout, ...)

Set-up installs into the Python that runs this file (use a virtual environment if you like), one
numbered step at a time with pip's own progress: torch first, deliberately (only when torch is
missing), then requirements.txt's core, then each of its optional groups (DeepSpeed, the ONNX stack,
peft) in a pip call of its own, then this repository in editable mode so that scripts also run by
path. A group that fails to install is named with the command that retries it; the sections that
need it SKIP with the reason, the rest runs. It is skipped when nothing changed since the last
successful set-up (a set-up with a failed group tries that group again next time).

Which torch:
    --cpu                  the CPU-only build from PyTorch's CPU index (about 200 MB instead of the
                           several GB of CUDA libraries that plain `pip install torch` pulls on Linux)
    TORCH=...              the pip requirement, whole (default "torch==2.13.0"); e.g.
                           TORCH="torch==2.13.0+cpu" or TORCH="/path/to/torch-2.13.0-...whl"
    TORCH_INDEX=URL        the index torch comes from (--cpu sets https://download.pytorch.org/whl/cpu)
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAMP = ROOT / ".cache" / "setup.stamp"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
COMMANDS = {"book", "test", "setup"}


def sh(*cmd: str) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def torch_install_args(cpu: bool) -> list[str]:
    """pip's arguments for torch: ``$TORCH`` split like a shell would, and the index to take it from."""
    args = shlex.split(os.environ.get("TORCH", "torch==2.13.0"))
    index = os.environ.get("TORCH_INDEX") or (CPU_INDEX if cpu else None)
    if index:
        args += ["--index-url", index]
    return args


def torch_platform_note() -> str | None:
    """What the package index's torch is on this platform, where it is not what Linux gets: on Windows
    and macOS plain ``pip install torch`` is the CPU build (macOS: with MPS), so ``--cpu`` changes
    nothing there, and CUDA torch on Windows comes from PyTorch's own CUDA index instead."""
    if sys.platform == "win32":
        return (
            "on Windows the package index's torch is the CPU build; for an NVIDIA GPU: set "
            "TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see pytorch.org for your CUDA) and "
            "run py run.py setup again after pip uninstall torch"
        )
    if sys.platform == "darwin":
        return "on macOS the package index's torch is the CPU build with Apple's MPS (--device mps)"
    return None


def setup(cpu: bool = False) -> None:
    digest = hashlib.sha256(
        b"".join((ROOT / f).read_bytes() for f in ("requirements.txt", "pyproject.toml"))
        + sys.executable.encode()
    ).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    pip = [sys.executable, "-m", "pip", "install"]
    print(f"set-up: installing into {sys.executable}", flush=True)
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode != 0:
        torch = torch_install_args(cpu)
        print(f"[1/4] torch: pip install {shlex.join(torch)}", flush=True)
        note = torch_platform_note()
        if note:
            print(f"      {note}", flush=True)
        sh(*pip, *torch)
    else:
        print("[1/4] torch: already installed", flush=True)
    core, groups = requirement_groups((ROOT / "requirements.txt").read_text())
    print("[2/4] the core packages of requirements.txt", flush=True)
    sh(*pip, *core)
    failed = []
    for n, (group, requirements) in enumerate(groups.items(), 1):
        print(f"[3/4] optional group {n}/{len(groups)}, {group}: {' '.join(requirements)}", flush=True)
        try:
            sh(*pip, *requirements)
        except subprocess.CalledProcessError as e:
            failed.append(group)
            print(
                f"set-up: the {group} group did not install (pip exit {e.returncode}); the sections that "
                f"need it will SKIP with the reason, the rest runs. Retry: pip install "
                f"{shlex.join(requirements)}",
                flush=True,
            )
    print("[4/4] this repository, in editable mode", flush=True)
    sh(*pip, "--no-deps", "-e", ".")
    if failed:  # no stamp: the next set-up tries the failed groups again
        print(f"set-up done, without: {', '.join(failed)}", flush=True)
        return
    STAMP.parent.mkdir(exist_ok=True)
    STAMP.write_text(digest)
    print("set-up done", flush=True)


def requirement_groups(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """requirements.txt's core requirements, and its optional groups: a line whose comment starts with
    ``[name]`` belongs to the group ``name``."""
    core: list[str] = []
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        requirement, _, comment = line.partition("#")
        if not requirement.strip():
            continue
        tag = comment.strip()
        if tag.startswith("[") and "]" in tag:
            groups.setdefault(tag[1 : tag.index("]")], []).append(requirement.strip())
        else:
            core.append(requirement.strip())
    return core, groups


def main(argv: list[str]) -> int:
    cpu = "--cpu" in argv
    argv = [a for a in argv if a != "--cpu"]
    if argv and argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        print(f"run.py: error: give a command: {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    wants_help = any(a in {"-h", "--help"} for a in argv[1:])
    if not (wants_help and argv[0] == "book"):  # the harness's help needs nothing installed
        setup(cpu)
    env = {**os.environ, "MPLBACKEND": os.environ.get("MPLBACKEND", "Agg")}
    if argv[0] == "book":
        flags = [f for f in argv[1:] if f != "--full"]
        if "--full" not in argv and not wants_help:
            flags.insert(0, "--quick")
        return subprocess.run([sys.executable, "-m", "verify", *flags], cwd=ROOT, env=env).returncode
    if argv[0] == "test":
        code = subprocess.run([sys.executable, "-m", "pytest", *argv[1:]], cwd=ROOT, env=env).returncode
        return 0 if code == 5 else code  # 5: no tests collected (e.g. a -k that matches nothing)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
