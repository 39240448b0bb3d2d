"""common.env on this machine, and the table of known incompatibilities on synthetic environments."""

import json
import os
import platform
import subprocess
import sys

import pytest

from common import env
from common.runner import SkipScript
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def report():
    return env.environment_report()


def test_report_on_this_machine(report):
    assert report["cores"] >= 1 and report["memory_gib"] > 0
    assert report["torch"]["version"].startswith("2.")
    for name in ("numpy", "transformers", "deepspeed", "tree", "onnx", "onnxruntime", "tokenizers"):
        p = report["packages"][name]
        assert p["version"] and p["imports"], p
    assert isinstance(report["warnings"], list)
    text = env.format_report(report)
    assert "torch" in text and "deepspeed" in text


def test_missing_package_is_reported_not_raised():
    p = env.package_status("surely_not_a_real_package_xyz")
    assert p == {
        "name": "surely_not_a_real_package_xyz",
        "import": "surely_not_a_real_package_xyz",
        "version": None,
        "imports": False,
        "error": "not installed",
    }


def test_require_raises_skip_with_hint():
    with pytest.raises(SkipScript) as e:
        env.require("fmoe")
    assert "fmoe" in str(e.value) and "CUDA" in e.value.hint
    assert env.require("json") is json


def _fake(report, **packages):
    r = json.loads(json.dumps(report))
    for name, (version, imports, error) in packages.items():
        r["packages"][name] = {
            "name": env.PACKAGES.get(name, name),
            "import": name,
            "version": version,
            "imports": imports,
            "error": error,
        }
    return [inc.message(r) for inc in env.INCOMPATIBILITIES if inc.applies(r)]


def test_autogptq_import_failure_is_a_warning(report):
    err = "ImportError: cannot import name 'no_init_weights' from 'transformers.modeling_utils'"
    warnings = _fake(report, auto_gptq=("0.7.1", False, err), transformers=("5.23.0", True, None))
    joined = "\n".join(warnings)
    assert "auto-gptq 0.7.1 is installed but does not import" in joined and "no_init_weights" in joined
    assert "transformers is 5.23.0" in joined


def test_cli_names_a_real_broken_autogptq_install(tmp_path):
    """An installed distribution (dist-info metadata) whose import fails as auto-gptq 0.7.1's does."""
    (tmp_path / "auto_gptq").mkdir()
    (tmp_path / "auto_gptq" / "__init__.py").write_text(
        "from transformers.modeling_utils import no_init_weights_that_moved as no_init_weights\n"
    )
    info = tmp_path / "auto_gptq-0.7.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: auto-gptq\nVersion: 0.7.1\n")
    out = subprocess.run(
        [sys.executable, "-m", "common.env"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"},
    )
    assert out.returncode == 0, out.stderr
    assert "auto-gptq    0.7.1  DOES NOT IMPORT: ImportError" in out.stdout
    warnings = out.stdout.split("Warnings", 1)[1]
    assert "auto-gptq 0.7.1 is installed but does not import" in warnings


def test_numpy2_with_old_torch(report):
    w = _fake(report, numpy=("2.0.1", True, None), torch=("1.10.1", True, None))
    assert any("NumPy 2.0.1 with torch 1.10.1" in x for x in w)
    assert not any(
        "NumPy" in x for x in _fake(report, numpy=("1.26.4", True, None), torch=("1.10.1", True, None))
    )


def test_deepspeed_without_dm_tree(report):
    assert any("dm-tree" in x for x in _fake(report, tree=(None, False, "not installed")))


def test_autoawq_pinned_torch(report):
    w = _fake(report, awq=("0.2.9", True, None), torch=("2.13.0", True, None))
    assert any("pinned to torch 2.6" in x for x in w)
    assert not any(
        "pinned" in x for x in _fake(report, awq=("0.2.9", True, None), torch=("2.6.0", True, None))
    )


def test_deepspeed_zero_collectives_deprecated_by_torch(report):
    ds = ("0.19.8", True, None)
    new, old = ("2.13.0", True, None), ("2.12.0", True, None)
    assert any("deprecates both" in x for x in _fake(report, deepspeed=ds, torch=new))
    assert not any("deprecates" in x for x in _fake(report, deepspeed=ds, torch=old))


def test_this_machine_has_no_false_alarms(report):
    # every warning here must be explained by an installed package state, never by a healthy setup
    for w in report["warnings"]:
        known = (
            "auto-gptq",
            "autoawq",
            "fastmoe",
            "tensorrt",
            "gptqmodel",
            "does not import",
            "deprecates both",
        )
        known += (
            "than the newest version tested",
            "than the oldest version tested",
        )  # requirements-floor.txt
        assert any(word in w for word in known)


def test_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "common.env", "--json"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"os", "cpu", "torch", "packages", "warnings"} <= set(data)


def test_cli_leaves_no_import_log_after_the_report():
    out = subprocess.run([sys.executable, "-m", "common.env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator" not in out.stderr + out.stdout  # DeepSpeed's import log is captured
    assert out.stdout.rstrip().splitlines()[-1].startswith(("Warnings: none", "  - "))


FAKE_LIB = """
import logging, sys
logger = logging.getLogger("FakeLib")
logger.propagate = False
logger.addHandler(logging.StreamHandler(stream=sys.stderr))  # as DeepSpeed does
logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we could not find it")
logger.warning("the fused kernels were built for another torch")
"""


def test_import_warnings_are_captured_and_real_ones_reported(tmp_path, monkeypatch, capfd):
    (tmp_path / "fakelib.py").write_text(FAKE_LIB)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(env.IMPORT_LOGGERS, "fakelib", "FakeLib")
    log: list[str] = []
    module = env.import_quietly("fakelib", log)
    assert module.logger.name == "FakeLib"
    assert capfd.readouterr().err == ""  # nothing leaks to stderr
    assert log == ["the fused kernels were built for another torch"]  # the benign CPU note is dropped
    module.logger.warning("later messages are the package's own")
    assert "later messages" in capfd.readouterr().err
    monkeypatch.setitem(env.PACKAGES, "fakelib", "fakelib")
    monkeypatch.setattr(env, "installed_version", lambda dist: "1.0")
    sys.modules.pop("fakelib")
    assert env.package_status("fakelib")["import_warnings"] == [
        "the fused kernels were built for another torch"
    ]


def test_device_and_dtype_choice():
    import torch

    device, reason = env.choose_device("cpu")
    assert device == "cpu" and reason
    dtype, why = env.choose_dtype("cpu")
    assert dtype == torch.float32 and "CPU" in why
    with pytest.raises(ValueError):
        env.choose_device("tpu")


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)
def test_keep_freed_memory_stops_page_faults_on_reuse():
    # in fresh processes: a 64 MiB tensor allocated and freed again and again touches fresh pages every
    # time (one minor fault per 4 KiB page) under glibc's defaults; with freed memory kept the heap
    # settles after a few rounds (PyTorch's aligned allocations need a little more than the block just
    # freed, so the first rounds may still grow the heap) and then reuses it without a fault
    code = (
        "import resource, sys, torch\n"
        "from common.env import keep_freed_memory\n"
        "applied = keep_freed_memory() if sys.argv[1] == 'kept' else None\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.ones(16 * 2**20)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "rounds = [faults() for _ in range(30)]\n"
        "print(applied, sum(rounds[-10:]))\n"
    )

    def last_ten_rounds(mode):
        out = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        ).stdout.split()
        return out[0], int(out[1])

    (_, default_faults), (applied, kept_faults) = last_ten_rounds("default"), last_ten_rounds("kept")
    assert applied == "True"
    assert default_faults >= 10 * 16384 and kept_faults * 100 < default_faults, (default_faults, kept_faults)


def test_import_status_says_why_a_package_does_not_import():
    from common.env import import_status

    assert import_status("numpy") == "imports"
    assert import_status("no_such_package_here") == "does not import: not installed"


@pytest.mark.parametrize(
    "optimum, warned",
    [((None, False, "not installed"), True), (("1.23.3", True, None), True), (("2.3.0", True, None), False)],
    ids=["no-optimum", "old-optimum", "optimum-2.3"],
)
def test_gptqmodel_with_peft_needs_optimum(report, optimum, warned):
    """peft's LoRA dispatch asks for optimum>=1.24 as soon as gptqmodel imports (s4_3_3_low_rank failed
    with an ImportError in the full AMX run); without gptqmodel nothing is said."""
    both = dict(gptqmodel=("7.7.0", True, None), peft=("0.21.2", True, None), optimum=optimum)
    said = "\n".join(_fake(report, **both))
    assert ("requires optimum version 1.24.0" in said) == warned
    no_gptqmodel = {**both, "gptqmodel": (None, False, "not installed")}
    assert "optimum" not in "\n".join(_fake(report, **no_gptqmodel))


def test_gptqmodel_beside_an_older_torch_is_a_warning_both_ways(report):
    older = "\n".join(_fake(report, gptqmodel=("7.7.0", True, None), torch=("2.13.0+cpu", True, None)))
    assert "gptqmodel 7.7.0 declares torch>=2.14.1" in older and "--no-deps" in older
    newer = "\n".join(_fake(report, gptqmodel=("7.7.0", True, None), torch=("2.14.1", True, None)))
    assert "gptqmodel" not in newer
    assert "gptqmodel" not in "\n".join(_fake(report, gptqmodel=(None, False, "not installed")))
