"""run.py, the newcomer's entry point: --help, the CPU wheel, a line per set-up step, pip not silenced."""

import subprocess
import sys
import types

import pytest

import run
from tests.conftest import REPO_ROOT


def test_help_exits_0_and_points_at_the_harness_help():
    proc = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert (
        "python3 run.py book --help" in proc.stdout
        and "--cpu" in proc.stdout
        and "TORCH_INDEX" in proc.stdout
    )
    none = subprocess.run([sys.executable, "run.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert none.returncode == 2 and none.stderr.strip() == "run.py: error: give a command: book, setup, test"


@pytest.mark.parametrize(
    "torch_env, index_env, cpu, expected",
    [
        (None, None, False, ["torch==2.13.0"]),
        (None, None, True, ["torch==2.13.0", "--index-url", run.CPU_INDEX]),
        (
            "torch==2.13.0+cpu",
            "https://example.org/simple",
            False,
            ["torch==2.13.0+cpu", "--index-url", "https://example.org/simple"],
        ),
        (
            "/wheels/torch-2.13.0-cp311-linux_x86_64.whl --no-deps",
            None,
            False,
            ["/wheels/torch-2.13.0-cp311-linux_x86_64.whl", "--no-deps"],
        ),
    ],
)
def test_which_torch(monkeypatch, torch_env, index_env, cpu, expected):
    for name, value in (("TORCH", torch_env), ("TORCH_INDEX", index_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert run.torch_install_args(cpu) == expected


def test_setup_says_each_step_and_lets_pip_show_its_progress(monkeypatch, tmp_path, capsys):
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(list(cmd))
        missing_torch = cmd[1:] == ["-c", "import torch"]
        return types.SimpleNamespace(returncode=1 if missing_torch else 0)

    monkeypatch.setattr(run, "STAMP", tmp_path / "setup.stamp")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    monkeypatch.delenv("TORCH", raising=False)
    monkeypatch.delenv("TORCH_INDEX", raising=False)
    assert run.main(["--cpu", "setup"]) == 0
    out = capsys.readouterr().out
    steps = ("[1/4] torch: pip install torch==2.13.0 --index-url", "[2/4]", "[3/4]", "[4/4]", "set-up done")
    for step in steps:
        assert step in out
    pips = [c for c in commands if c[1:4] == ["-m", "pip", "install"]]
    assert len(pips) == 6 and not any("--quiet" in c or "-q" in c for c in pips)  # torch, core, 3 groups, -e
    assert pips[0][4:] == ["torch==2.13.0", "--index-url", run.CPU_INDEX]
    assert pips[2][4:6] == ["deepspeed>=0.17.6", "dm-tree>=0.1.8"] and not any(
        "deepspeed" in a for a in pips[1]
    )

    commands.clear()
    monkeypatch.setattr(run, "setup", lambda cpu=False: pytest.fail("help needs no set-up"))
    assert run.main(["book", "--help"]) == 0
    assert commands == [[sys.executable, "-m", "verify", "--help"]]  # no --quick added to a help request


def test_requirement_groups_split_the_core_from_the_optional_groups():
    core, groups = run.requirement_groups((REPO_ROOT / "requirements.txt").read_text())
    assert set(groups) == {"deepspeed", "onnx", "peft"}
    assert groups["onnx"] == ["onnx>=1.17", "onnxscript>=0.6", "onnxruntime>=1.18"]
    assert "numpy>=1.26" in core and not any(r.startswith(("deepspeed", "onnx", "peft")) for r in core)


def test_a_group_that_fails_to_install_is_named_and_the_rest_installs(monkeypatch, tmp_path, capsys):
    """A requirement that cannot be satisfied in one group: set-up says so with the retry command, installs
    the other groups and the repository, and leaves no stamp (the next set-up tries again)."""
    text = (
        "numpy>=1.26\nno-such-package-xyz==0.0.1   # [deepspeed] cannot be satisfied\n"
        "onnx>=1.17  # [onnx] installs\n"
    )
    (tmp_path / "requirements.txt").write_text(text)
    (tmp_path / "pyproject.toml").write_text("")
    installed = []

    def fake_run(cmd, check=False, **kwargs):
        if cmd[1:] == ["-c", "import torch"]:
            return types.SimpleNamespace(returncode=0)
        if "no-such-package-xyz==0.0.1" in cmd:  # what pip does: exit 1, nothing installed
            raise subprocess.CalledProcessError(1, cmd)
        installed.append(list(cmd[4:]))
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(run, "ROOT", tmp_path)
    monkeypatch.setattr(run, "STAMP", tmp_path / ".cache" / "setup.stamp")
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    run.setup()
    out = capsys.readouterr().out
    assert "the deepspeed group did not install (pip exit 1)" in out
    assert "Retry: pip install no-such-package-xyz==0.0.1" in out
    assert installed == [["numpy>=1.26"], ["onnx>=1.17"], ["--no-deps", "-e", "."]]
    assert "set-up done, without: deepspeed" in out and not run.STAMP.exists()


@pytest.mark.parametrize(
    "platform, says",
    [("win32", "TORCH_INDEX=https://download.pytorch.org/whl/cu128"), ("darwin", "MPS"), ("linux", None)],
)
def test_the_torch_step_says_what_the_index_gives_on_each_platform(monkeypatch, platform, says):
    """Windows and macOS get the CPU build from the package index (simulated here); Linux needs no note."""
    monkeypatch.setattr(run.sys, "platform", platform)
    note = run.torch_platform_note()
    assert note is None if says is None else says in note
