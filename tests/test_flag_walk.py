"""Every flag of every section script, tried as a hostile user would (#22, item 8).

The test walks each script's parser. Each numeric flag gets 0, -1, nan, inf and an absurdly large
value. Each path flag gets a missing path, a folder where a file belongs (or a file where a folder
belongs) and a corrupt file. Each free-text flag gets values it cannot take.

A numeric flag's type declares its range (:mod:`common.runner`: ``positive_int``, ``float_between``,
...) and its help shows that range:
- a value outside the range must be argparse's one-line error naming the flag (exit 2);
- a value inside must pass the script's checks (``--check-only``: exit 0), or be refused by them in one
  line (exit 2: a model or data check, say a context longer than the corpus), or SKIP (77) where an
  optional package is missing.

Never a traceback, never the work: ``--check-only`` stops every script where its checks end. A flag
with no declared range, path case or bad text fails the test, so a new flag is covered when it
lands.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import pytest

from common.runner import ScriptParser, run_script
from tests.conftest import REPO_ROOT

SCRIPTS = sorted(str(p.relative_to(REPO_ROOT))[:-3].replace("/", ".") for p in REPO_ROOT.glob("ch0*/s*.py"))
NUMBERS = ("0", "-1", "nan", "inf", "1000000000000")
SHARED = {"--out", "--json", "--seed"}  # the runner's own flags: one script is enough (tested below)
# free-text flags and values each script must refuse in one line
TEXT_CASES = {"--languages": ["", "xx", "de,es"]}
LOGGING_ERROR = re.compile(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", re.DOTALL)
PATH_FLAGS = {"--hf-path", "--corpus", "--models", "--out", "--json"}
# what a script needs beside a path flag for the path to be used (quick mode's distillation task is digits)
PATH_CONTEXT = {"ch07_deployment.s7_4_3_knowledge_distillation": ["--task", "lm"]}


class _Parsed(Exception):
    pass


def parser_of(module: str, monkeypatch) -> ScriptParser:
    """The parser a script's main builds (stopped before it parses anything)."""
    got = {}

    def capture(self, args=None, namespace=None):
        got["parser"] = self
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(ScriptParser, "parse_args", capture)
        with pytest.raises(_Parsed):
            importlib.import_module(module).main([])
    return got["parser"]


def flags_of(parser) -> dict:
    """``{flag: action}`` for every flag a user can give a value to (switches, choices and hidden
    launcher flags left out: argparse judges those by itself)."""
    return {
        a.option_strings[-1]: a
        for a in parser._actions
        if a.option_strings and a.nargs != 0 and not a.choices and a.help != "==SUPPRESS=="
    }


def declared_ok(t, text: str) -> bool:
    """Whether the type's declared range (its ``low``/``high`` attributes) holds the value ``text``."""
    value = float(text)
    if not math.isfinite(value) or (t.__name__.startswith("int") and value != int(value)):
        return False
    if value in getattr(t, "excludes", ()):
        return False
    low_ok = t.low is None or (value > t.low if t.low_open else value >= t.low)
    high_ok = t.high is None or (value < t.high if t.high_open else value <= t.high)
    return low_ok and high_ok


def run(module: str, argv: list[str], tmp_path: Path, capsys) -> tuple[int, str, str]:
    """Run a script's main through the runner with ``--check-only --quick``: (exit code, stdout, stderr)."""
    main = importlib.import_module(module).main
    base = ["--check-only", "--quick", "--device", "cpu"]
    if "--out" not in argv:
        base += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        run_script(main, [*argv, *base])
    out, err = capsys.readouterr()
    # a library's logger that kept an earlier test's captured stderr reports its own failure to write:
    # not the script's output
    err = LOGGING_ERROR.sub("", err)
    return e.value.code, out, err


def assert_one_line_refusal(code, err, why):
    assert code == 2, (why, code, err[-2000:])
    assert "Traceback" not in err, (why, err[-2000:])
    assert err.strip().splitlines()[-1].split(": error: ", 1)[1], (why, err)


def assert_checked(code, out, err, why):
    """Exit 0 after the checks, a one-line refusal by the script's own checks, or a SKIP."""
    assert code in (0, 2, 77), (why, code, err[-2000:])
    assert "Traceback" not in err, (why, err[-2000:])
    if code == 0:
        assert "checks passed" in out, (why, out[-1000:])
    elif code == 2:
        assert_one_line_refusal(code, err, why)


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_flag_is_checked_before_the_work(module, tmp_path, capsys, monkeypatch):
    flags = flags_of(parser_of(module, monkeypatch))
    uncovered = [
        f
        for f, a in flags.items()
        if not hasattr(a.type, "span") and f not in TEXT_CASES and f not in PATH_FLAGS
    ]
    assert not uncovered, f"{module}: flags without a declared range, path case or bad text: {uncovered}"
    for flag, action in flags.items():
        if flag in SHARED or flag in PATH_FLAGS:
            continue
        values = TEXT_CASES.get(flag) or NUMBERS
        for value in values:
            why = f"{module} {flag} {value!r}"
            code, out, err = run(module, [flag, value], tmp_path, capsys)
            if flag in TEXT_CASES or not declared_ok(action.type, value):
                assert_one_line_refusal(code, err, why)
                if flag not in TEXT_CASES:
                    assert f"argument {flag}" in err.strip().splitlines()[-1], why
            else:
                assert_checked(code, out, err, why)
    assert not (tmp_path / "out").exists(), f"{module}: --check-only wrote its output folder"


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_ranged_flag_says_its_range(module, monkeypatch, capsys):
    parser = parser_of(module, monkeypatch)
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, action in flags_of(parser).items():
        if hasattr(action.type, "span"):
            assert f"[{action.type.span}]" in text, (module, flag)


@pytest.mark.parametrize("module", SCRIPTS)
def test_defaults_pass_the_checks_without_doing_the_work(module, tmp_path, capsys):
    code, out, err = run(module, [], tmp_path, capsys)
    assert code in (0, 77), err[-2000:]
    assert code == 77 or "checks passed" in out
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A good HF folder of the test LM, one with its weights cut in half, and a GPT-2 folder."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from common.lm_source import save_hf_folder
    from common.pretrained import pretrained_lm

    root = tmp_path_factory.mktemp("hf")
    model, tokenizer, _ = pretrained_lm("test", progress=False)
    good = save_hf_folder(model, tokenizer, str(root / "llama"))
    cut = Path(save_hf_folder(model, tokenizer, str(root / "truncated")))
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    torch.manual_seed(0)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(good).save_pretrained(gpt2)
    return {"good": good, "truncated": str(cut), "gpt2": str(gpt2)}


def path_cases(flag: str, tmp_path: Path, hf: dict) -> list[tuple[str, list[str], bool]]:
    """``(label, values, may pass)`` for a path flag: what a user could give it by mistake."""
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder\n")
    missing = str(tmp_path / "missing")
    if flag == "--hf-path":
        return [
            ("missing", [missing], False),
            ("a file", [str(a_file)], False),
            ("a folder without config.json", [str(tmp_path)], False),
            ("truncated weights", [hf["truncated"]], False),
            ("another architecture", [hf["gpt2"]], True),  # scripts that only run a forward pass take it
        ]
    if flag == "--corpus":
        return [
            ("missing", [missing], False),
            ("a folder", [str(tmp_path)], False),
            ("binary", [str(binary)], False),
        ]
    if flag == "--models":
        bad_json = tmp_path / "config.json"
        bad_json.write_text(json.dumps({"hello": 1}))
        empty = tmp_path / "empty"
        empty.mkdir(exist_ok=True)
        return [
            ("missing", [missing], False),
            ("a folder without config.json", [str(empty)], False),
            ("binary", [str(binary)], False),
            ("not a model's config", [str(bad_json)], False),
        ]
    raise AssertionError(f"no path cases for {flag}")


@pytest.mark.parametrize("module", SCRIPTS)
def test_every_path_flag_refuses_what_it_cannot_read(module, tmp_path, capsys, monkeypatch, hf_folders):
    flags = flags_of(parser_of(module, monkeypatch))
    for flag in sorted(set(flags) & (PATH_FLAGS - {"--out", "--json"})):
        for label, values, may_pass in path_cases(flag, tmp_path, hf_folders):
            code, out, err = run(module, [flag, *values, *PATH_CONTEXT.get(module, [])], tmp_path, capsys)
            why = f"{module} {flag} {label}"
            if may_pass:
                assert_checked(code, out, err, why)
            else:
                assert_one_line_refusal(code, err, why)
    if "--hf-path" in flags:  # and a good folder passes
        argv = ["--hf-path", hf_folders["good"], *PATH_CONTEXT.get(module, [])]
        code, out, err = run(module, argv, tmp_path, capsys)
        assert_checked(code, out, err, f"{module} --hf-path good")
        assert code in (0, 77), err[-2000:]


@pytest.mark.parametrize(
    "argv, may_pass",
    [
        (["--out", "{file}"], False),  # a file as the output folder
        (["--out", "{file}/under"], False),  # a folder under a file
        (["--out", "{tmp}/new/deeper"], True),  # a folder to create: fine (and --check-only leaves it)
        (["--json", "{tmp}"], False),  # a folder as the JSON file
        (["--json", "{file}/figures.json"], False),
        (["--seed", "-1"], False),
        (["--seed", "4294967296"], False),
        (["--seed", "4294967295"], True),
    ],
)
def test_the_runners_own_flags(argv, may_pass, tmp_path, capsys):
    """--out, --json and --seed are the runner's, the same in every script: tried on one."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = [a.format(file=a_file, tmp=tmp_path) for a in argv]
    code, out, err = run("ch04_transformer_moe.s4_2_1_moe", argv, tmp_path, capsys)
    if may_pass:
        assert code == 0 and "checks passed" in out, err
        assert not (tmp_path / "new").exists()
    else:
        assert_one_line_refusal(code, err, argv)
