"""The README section table: purposes from docstrings, statuses from committed reports."""

import json

from verify.table import build_table, purpose


def _script(root, rel, doc):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'"""{doc}"""\n')
    return path


def test_purpose_reads_the_first_paragraph_and_a_note(tmp_path):
    p = _script(tmp_path, "ch09_x/s9_1_1_a.py", "Section 9.1.1: one line that\nwraps.\n\nMore text.")
    assert purpose(p) == ("9.1.1", "one line that wraps")
    p = _script(tmp_path, "ch09_x/s9_1_2_b.py", "Section 9.1.2 (reader project): a project.")
    assert purpose(p) == ("9.1.2", "a project (reader project)")
    p = _script(tmp_path, "ch09_x/s9_1_3_c.py", "No section line here.")
    assert purpose(p) == ("9.1.3", "No section line here")


def test_table_has_a_status_column_per_report(tmp_path):
    _script(tmp_path, "ch09_x/s9_1_1_a.py", "Section 9.1.1: runs.")
    _script(tmp_path, "ch09_x/s9_1_2_b.py", "Section 9.1.2: needs a GPU.")
    rep = tmp_path / "verify" / "reports" / "cpu-quick"
    rep.mkdir(parents=True)
    scripts = [
        {"name": "ch09_x/s9_1_1_a.py", "status": "PASS", "reason": "", "seconds": 3.2},
        {"name": "ch09_x/s9_1_2_b.py", "status": "SKIP", "reason": "no CUDA | here", "seconds": 0.4},
    ]
    (rep / "report.json").write_text(json.dumps({"environment": {}, "scripts": scripts, "summary": {}}))
    rows = build_table(tmp_path).splitlines()
    assert rows[0] == "| script | section | what it shows | cpu-quick |"
    assert rows[2] == "| [`s9_1_1_a.py`](ch09_x/s9_1_1_a.py) | 9.1.1 | runs | PASS 3 s |"
    assert rows[3].endswith("| SKIP 0 s (no CUDA \\| here) |")
