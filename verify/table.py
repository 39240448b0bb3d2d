"""Rewrite README.md's section table from the scripts' docstrings and the committed reports.

    python -m verify.table            # after committing new reports under verify/reports/

Each row: the script, its book section, the first line of its docstring, and its status in each
report under verify/reports/<name>/report.json (one column per report, e.g. cpu-quick, cuda-full).
The table sits between the markers below in README.md; nothing else is touched.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from verify.harness import REPO_ROOT, discover

BEGIN, END = "<!-- section-table:begin -->", "<!-- section-table:end -->"


def purpose(path: Path) -> tuple[str, str]:
    """(section, purpose) from a script's docstring: 'Section 4.2.2: Switch ...' -> ('4.2.2', ...)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, on one line
    m = re.match(r"Section\s+([\d.]+)\s*(\([^)]*\))?\s*[:\-–]\s*(.*)", first)
    if m:
        note = f" ({m.group(2)[1:-1]})" if m.group(2) else ""
        return m.group(1), m.group(3).rstrip(".") + note
    m = re.search(r"s(\d+)_(\d+)_(\d+)_", path.name)
    return (".".join(m.groups()) if m else "", first.rstrip("."))


def build_table(root: Path = REPO_ROOT) -> str:
    reports = {}
    for rj in sorted((root / "verify" / "reports").glob("*/report.json")):
        data = json.loads(rj.read_text())
        reports[rj.parent.name] = {e["name"]: e for e in data["scripts"]}
    head = "| " + " | ".join(["script", "section", "what it shows", *reports]) + " |"
    rule = "|---|---|---|" + "---|" * len(reports)
    rows = [head, rule]
    for rel in discover(root):
        section, what = purpose(root / rel)
        cells = []
        for entries in reports.values():
            e = entries.get(rel)
            if e is None:
                cells.append("not run")
            else:
                why = f" ({e['reason'][:60]})" if e["status"] == "SKIP" and e.get("reason") else ""
                cells.append(f"{e['status']} {e['seconds']:.0f} s{why}".replace("|", "\\|"))
        rows.append("| " + " | ".join([f"[`{Path(rel).name}`]({rel})", section, what, *cells]) + " |")
    return "\n".join(rows)


def main() -> int:
    readme = REPO_ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + build_table() + "\n" + text[end:])
    print(build_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
