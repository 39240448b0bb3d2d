"""Counts, sizes and rates are checked by their argparse type (common.runner) in every section script:
0, -1, nan and inf for the flags below are a usage error (exit 2) before any work.  (The full walk
over every numeric and path flag, with a --check-only phase, is #22's item 8; this covers the flags
named there that a type can judge.)"""

import contextlib
import importlib
import io
import math
from pathlib import Path

import pytest

from common.runner import positive_float
from tests.conftest import REPO_ROOT

POSITIVE_INTS = ("--eval-batches", "--repeats", "--rounds", "--new-tokens", "--max-new-tokens", "--heads")
POSITIVE_INTS += ("--d-model", "--context", "--calib-samples", "--top-k")
POSITIVE_FLOATS = ("--lr", "--lm-lr", "--temperature")
SCRIPTS = sorted(str(p.relative_to(REPO_ROOT))[:-3].replace("/", ".") for p in REPO_ROOT.glob("ch0*/s*.py"))


def _flags_of(module: str) -> set[str]:
    """The flags a script's --help lists."""
    main = importlib.import_module(module).main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return {w.strip(",[]") for w in out.getvalue().split() if w.startswith("--")}


def test_positive_float_refuses_what_no_rate_can_be():
    assert positive_float("3e-3") == 0.003
    for bad in ("0", "-1", "nan", "inf", "-inf", "fast"):
        with pytest.raises(Exception, match="finite number above 0|not a number"):
            positive_float(bad)
    assert not math.isnan(positive_float("1e-300"))


@pytest.mark.parametrize("module", SCRIPTS)
def test_counts_and_rates_are_refused_before_any_work(module, tmp_path, capsys):
    flags = _flags_of(module)
    checked = [(f, v) for f in POSITIVE_INTS if f in flags for v in ("0", "-1")]
    checked += [(f, v) for f in POSITIVE_FLOATS if f in flags for v in ("0", "-1", "nan", "inf")]
    main = importlib.import_module(module).main
    for flag, value in checked:
        with pytest.raises(SystemExit) as e:
            main([flag, value, "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert e.value.code == 2, (flag, value)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {flag}" in err, (flag, value, err)
    assert not (Path(tmp_path) / "out").exists()  # refused before the --out folder was made
