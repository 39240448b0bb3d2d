"""The script runner: shared flags, quick mode from the environment, skip -> 77, figures JSON, warnings."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from common.folder_lock import release_all
from common.runner import SKIP_EXIT_CODE, SkipScript, parse_args, script_parser

SCRIPT = textwrap.dedent('''
    """A test script: its behaviour is chosen by --mode."""
    import warnings
    from common.runner import SkipScript, UsageError, checks_done, parse_args, run_script, script_parser

    def main(argv=None):
        parser = script_parser(__doc__)
        parser.add_argument("--mode", default="pass", help="pass, skip, fail, warn, notdict or nochecks")
        args = parse_args(parser, argv)
        if args.mode != "nochecks":
            checks_done(args)
        if args.mode == "skip":
            raise SkipScript("needs a GPU", "run it on a machine with CUDA")
        if args.mode == "fail":
            raise RuntimeError("boom")
        if args.mode == "usage":
            raise UsageError("corpus file x.txt is empty")
        if args.mode == "warn":
            warnings.warn("this is deprecated", DeprecationWarning)
            warnings.warn("careful", UserWarning)
        if args.mode == "notdict":
            return [1, 2]
        return {"loss": 0.5, "quick": args.quick, "device": args.device, "seed": args.seed}

    if __name__ == "__main__":
        run_script(main)
''')


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "s_test.py"
    path.write_text(SCRIPT)
    return path


def run(script, *flags, env=None):
    from tests.conftest import REPO_ROOT

    full_env = {k: v for k, v in os.environ.items() if k != "BOOK_QUICK"}
    full_env.update({"PYTHONPATH": str(REPO_ROOT), **(env or {})})
    out = script.parent / "out.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--json", str(out), *flags],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    payload = json.loads(out.read_text()) if out.exists() else None
    return proc, payload


def test_pass_writes_figures_and_prints_table(script):
    proc, payload = run(script, "--seed", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert payload["status"] == "PASS"
    assert payload["figures"] == {"loss": 0.5, "quick": False, "device": "cpu", "seed": 3}
    assert "figures" in proc.stdout and "0.5000" in proc.stdout


def test_quick_from_flag_and_environment(script):
    _, flag = run(script, "--quick")
    _, from_env = run(script, env={"BOOK_QUICK": "1"})
    assert flag["figures"]["quick"] is True and from_env["figures"]["quick"] is True


def test_skip_exits_77_with_reason(script):
    proc, payload = run(script, "--mode", "skip")
    assert proc.returncode == SKIP_EXIT_CODE == 77
    assert payload["status"] == "SKIP"
    assert "needs a GPU" in payload["reason"] and "CUDA" in payload["reason"]


def test_failure_exits_1_with_reason(script):
    proc, payload = run(script, "--mode", "fail")
    assert proc.returncode == 1
    assert payload["status"] == "FAIL" and payload["reason"] == "RuntimeError: boom"
    assert "Traceback" in proc.stderr


def test_main_must_return_a_dict(script):
    proc, payload = run(script, "--mode", "notdict")
    assert proc.returncode == 1 and "must return a dict" in payload["reason"]


def test_warnings_are_captured_and_still_shown(script):
    proc, payload = run(script, "--mode", "warn")
    assert proc.returncode == 0
    kinds = [w.split(":")[0] for w in payload["warnings"]]
    assert kinds == ["DeprecationWarning", "UserWarning"]
    assert "careful" in proc.stderr


def test_bad_flag_is_a_failure_not_a_skip(script):
    proc, _ = run(script, "--no-such-flag")
    assert proc.returncode == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], "argument --seed: a seed must be from 0 to 4294967295, got -1"),
        (["--seed", str(2**32)], "argument --seed: a seed must be from 0 to 4294967295, got 4294967296"),
        (["--seed", "abc"], "argument --seed: not an integer: 'abc'"),
        (
            ["--device", "tpu"],
            "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda', 'mps')",
        ),
    ],
)
def test_bad_common_flags_are_one_usage_error_of_the_scripts_own_parser(script, flags, message):
    proc, payload = run(script, *flags)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"s_test.py: error: {message}"
    assert "--mode MODE" in proc.stderr  # one parser: the usage line names the script's own options
    assert "Traceback" not in proc.stderr
    assert payload["status"] == "FAIL" and payload["reason"] == f"usage error: {message}"


def test_usage_error_is_one_line_and_exit_2(script):
    proc, payload = run(script, "--mode", "usage")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "s_test.py: error: corpus file x.txt is empty"
    assert payload["reason"] == "usage error: corpus file x.txt is empty"


def test_output_targets_are_checked_before_the_work(script, tmp_path):
    from tests.conftest import REPO_ROOT

    def run_plain(*flags):
        return subprocess.run(
            [sys.executable, str(script), *flags],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=120,
        )

    proc = run_plain("--json", str(tmp_path), "--mode", "fail")
    assert proc.returncode == 2 and "boom" not in proc.stderr  # refused before main's work
    assert proc.stderr.splitlines()[-1] == (
        f"s_test.py: error: argument --json: {tmp_path} is a folder; give a file path such as "
        f"{tmp_path / 'figures.json'}"
    )
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*"))  # no temporary file left
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_plain("--out", str(a_file / "sub"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        f"s_test.py: error: argument --out: cannot create {a_file / 'sub'}: {a_file} is not a folder"
    )
    proc = run_plain("--json", str(a_file / "f.json"))
    assert proc.returncode == 2 and f"{a_file} is not a folder" in proc.stderr


def test_a_read_only_out_is_a_usage_error(monkeypatch, tmp_path, capsys):
    # root may write anywhere, so the test asks os.access the question a plain user's run would
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(SystemExit) as e:
        parse_args(script_parser(prog="s"), ["--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"s: error: argument --out: cannot create {tmp_path / 'run'}: {tmp_path} is not writable"


def test_parse_args_leaves_the_allocator_alone(monkeypatch):
    from common import env

    monkeypatch.setattr(env, "keep_freed_memory", lambda: pytest.fail("parse_args must not call it"))
    parse_args(script_parser(), ["--device", "cpu"])


def test_env_and_runner_import_in_either_order_and_share_skip():
    code = (
        "import common.env, common.runner, common.errors\n"
        "assert common.runner.SkipScript is common.env.SkipScript is common.errors.SkipScript\n"
        "assert common.runner.SKIP_EXIT_CODE == 77"
    )
    for first in ("common.env", "common.runner"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {first}\n{code}"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr


def test_help_lists_common_flags(script):
    from tests.conftest import REPO_ROOT

    proc = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    for flag in ("--quick", "--device", "--seed", "--json", "--out", "--mode"):
        assert flag in proc.stdout


def test_parse_args_seeds_and_picks_device(monkeypatch):
    monkeypatch.delenv("BOOK_QUICK", raising=False)
    args = parse_args(script_parser(), ["--seed", "7", "--device", "cpu"])
    a = (random.random(), torch.rand(1).item())
    parse_args(script_parser(), ["--seed", "7"])
    assert (random.random(), torch.rand(1).item()) == a
    assert args.device == "cpu" and args.quick is False and args.device_reason
    assert args.out == os.path.join("runs", "test_runner")  # named after the calling script
    assert parse_args(script_parser(), ["--out", "elsewhere"]).out == "elsewhere"
    assert os.path.isfile(os.path.join(args.out, ".lock"))  # held for this run (common.folder_lock)
    release_all()
    assert not os.path.exists(args.out) and not os.path.exists("elsewhere")  # nothing was written there


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA; the test checks the CPU-only path"
)
def test_asking_for_missing_cuda_skips():
    with pytest.raises(SkipScript, match="no CUDA"):
        parse_args(script_parser(), ["--device", "cuda"])


def test_check_only_stops_where_the_checks_end(script, tmp_path):
    proc, payload = run(script, "--check-only", "--out", str(tmp_path / "never"))
    assert proc.returncode == 0 and "checks passed" in proc.stdout
    assert payload["status"] == "CHECKED" and payload["figures"] == {}
    assert not (tmp_path / "never").exists()  # --check-only writes no output folder
    proc, payload = run(script, "--check-only", "--mode", "usage")
    assert proc.returncode == 0  # checks_done came first: the usage error of the work is not reached
    proc, payload = run(script, "--check-only", "--mode", "nochecks")
    assert proc.returncode == 1 and "never called common.runner.checks_done" in payload["reason"]


def test_range_types_say_what_they_take_and_refuse_the_rest():
    import argparse

    from common.runner import document_ranges, float_between, int_between, int_list, unit_float

    half_open = float_between(0, 1, high_open=True)
    assert (half_open.span, half_open("0"), half_open("0.5")) == ("in [0, 1)", 0.0, 0.5)
    for bad in ("1", "-0.1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            half_open(bad)
    assert float_between(0, None, low_open=True).span == "above 0" and unit_float("1") == 1.0
    assert float_between(None, 5).span == "at most 5"
    assert int_list(1, 8)("1, 2,8") == [1, 2, 8]
    for bad in ("1,,2", "0,1", "1,9", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(1, 8)(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int_between(2, 9), help="a count")
    document_ranges(parser)
    document_ranges(parser)  # once only
    assert parser._actions[-1].help == "a count [from 2 to 9]"
