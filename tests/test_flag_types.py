"""Counts, sizes and rates are checked by their argparse type (common.runner) in every section script:
0, -1, nan and inf for the flags below are a usage error (exit 2) before any work, and quick mode keeps
a value the user gave.  (tests/test_flag_walk.py walks every numeric and path flag of every script
with --check-only; this module covers the cases #22 named one by one.)"""

import contextlib
import importlib
import io
import math
from pathlib import Path

import pytest

from common.runner import group_size_int, int_between, positive_float, quick_or_full
from tests.conftest import REPO_ROOT

POSITIVE_INTS = ("--eval-batches", "--repeats", "--rounds", "--new-tokens", "--max-new-tokens", "--heads")
POSITIVE_INTS += ("--d-model", "--context", "--calib-samples", "--top-k", "--distil-steps", "--batch-size")
POSITIVE_FLOATS = ("--lr", "--lm-lr", "--temperature", "--timeout")
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


def test_group_sizes_grids_and_quick_defaults():
    assert [group_size_int(t) for t in ("-1", "1", "128")] == [-1, 1, 128]
    for bad in ("0", "-2", "x"):
        with pytest.raises(Exception, match="group size|not an integer"):
            group_size_int(bad)
    with pytest.raises(Exception, match="from 2 to 200, got 100000"):
        int_between(2, 200)("100000")
    import argparse

    given = argparse.Namespace(quick=True, group_size=100000, calib_samples=None)
    quick_or_full(given, group_size=(32, 128), calib_samples=(16, 64))
    assert (given.group_size, given.calib_samples) == (100000, 16)  # the user's value is kept in quick mode
    full = argparse.Namespace(quick=False, group_size=None)
    quick_or_full(full, group_size=(32, 128))
    assert full.group_size == 128


@pytest.mark.parametrize(
    "module,argv,says",
    [
        (
            "ch07_deployment.s7_4_1_gptq",
            ["--group-size", "100000"],
            "group_size=100000 must be -1 or a positive",
        ),
        (
            "ch07_deployment.s7_4_1_awq",
            ["--group-size", "100000"],
            "group_size=100000 must be -1 or a positive",
        ),
        ("ch07_deployment.s7_4_1_gptq", ["--calib-samples", "100000"], "100000 samples of"),
        (
            "ch07_deployment.s7_4_1_awq",
            ["--grid", "100000"],
            "argument --grid: the value must be from 2 to 200",
        ),
        ("ch04_transformer_moe.s4_3_2_onnx", ["--opset", "999"], "argument --opset: from 7 to "),
    ],
)
def test_quick_mode_keeps_the_value_given_and_refuses_it_before_the_work(
    module, argv, says, tmp_path, capsys
):
    """Quick mode no longer caps --group-size or --calib-samples behind the user's back: the value given
    is checked against the model and the data, a one-line error before the work."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--quick", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2
    assert says in capsys.readouterr().err.strip().splitlines()[-1]
