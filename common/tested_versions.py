"""The range of each dependency's versions that the book was run with, and warnings outside it.

``requirements-floor.txt`` pins the lowest version of every dependency that the tests and the quick
book passed with (``verify/reports/cpu-quick-floor/``) and names, on the same line, the newest version
they passed with (``verify/reports/cpu-quick/`` and the other reports of record)::

    transformers==5.20.1     # newest tested: 5.25.0

:func:`range_warnings` compares what is installed with both; ``python -m common.env`` and ``python -m
verify`` show them with the environment's other version warnings.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

FLOOR_FILE = Path(__file__).resolve().parent.parent / "requirements-floor.txt"
_LINE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)==([^\s#]+)\s*(?:#\s*newest tested:\s*([^\s;,]+))?")


def tested_ranges(path: Path = FLOOR_FILE) -> dict[str, tuple[str, str | None]]:
    """``{distribution: (lowest tested, newest tested or None)}`` from the floor file (empty if absent)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    ranges = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            ranges[m.group(1).lower()] = (m.group(2), m.group(3))
    return ranges


def release(version: str | None) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '1.26.0rc1' -> (1, 26, 0); None -> ()."""
    if not version:
        return ()
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def range_warnings(installed=installed_version, path: Path = FLOOR_FILE) -> list[str]:
    """One line for each installed dependency below its lowest tested version or above its newest."""
    out = []
    for name, (low, high) in tested_ranges(path).items():
        have = installed(name)
        if have is None:
            continue
        if release(have) < release(low):
            out.append(
                f"{name} {have} is older than the oldest version tested, {low} ({path.name}; the newest "
                f"tested is {high or low}): pip install '{name}>={low}'"
            )
        elif high is not None and release(have) > release(high):
            out.append(
                f"{name} {have} is newer than the newest version tested, {high} (the oldest tested is "
                f"{low}, {path.name}); if a section fails, pip install '{name}=={high}'"
            )
    return out
