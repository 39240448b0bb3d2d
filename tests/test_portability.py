"""Every place where the book's behaviour depends on the machine, the platform or what imports, and
the tests that force each answer, so that the branch this machine does not take is tested too.

Each line: the branch, where it lives, and the tests that force both sides (``this module`` for the
tests below). ``test_every_test_named_here_exists`` keeps the list honest: a named test that is
renamed or removed fails it.

Devices and dtypes
- CUDA, MPS or CPU for ``--device auto``; CUDA or MPS asked for but absent: ``common.env.choose_device``:
  this module, test_device_choice_forced.
- bf16 or fp16 on a GPU, fp32 on a CPU: ``common.env.choose_dtype``: this module,
  test_dtype_choice_forced;
  tests/test_dtype_flag.py::test_default_is_fp32_on_a_cpu_and_bf16_on_a_gpu_that_has_it.
- bf16 native on the CPU (oneDNN: AVX512_BF16 or AMX) or emulated: ``common.env.cpu_bf16_native``, read by
  ``--dtype``'s reason, ``common.quant_runtime.activation_dtype`` and the estimators' bf16 rate:
  tests/test_dtype_flag.py::test_bf16_on_a_cpu_without_it_says_it_is_emulated,
  tests/test_quant_runtime.py::test_activation_dtype_follows_the_device_both_ways,
  tests/test_ch07_estimation_scripts.py::test_bf16_is_measured_beside_fp32_where_the_cpu_has_it.
- fp16 native on the CPU (oneDNN: AVX512_FP16 or AMX-FP16), which makes DeepSpeed accept fp16 there, and
  DeepSpeed's bf16 answer: ``s4_3_2_deepspeed``: tests/test_deepspeed_zero.py::test_half_precision_both_ways,
  tests/test_deepspeed_zero.py::test_script_reports_fp16_both_ways; the environment's line
  ``common.env.cpu_half_kernels``: this module, test_native_half_kinds_forced.
- The int4 weight-only kernel's rules, CPU or CUDA (``common.quant_runtime.int4_refusal``): this
  module, test_int4_rules_by_device; the CUDA run itself:
  tests/test_quant_runtime.py::test_int4_kernel_on_cuda_equals_the_plain_path (skipped without a GPU).

CPU instruction sets
- torch's kernels (``torch.backends.cpu.get_cpu_capability()``, held down by ``ATEN_CPU_CAPABILITY``) and
  the environment report that names them: this module, test_cpu_capability_held_to_avx2_is_reported
  (the whole quick book held to AVX2 is the report verify/reports/cpu-quick-avx2/).
- int8 saturation in onnxruntime without VNNI (``common.onnx_export.int8_saturates``, ``reduce_range``):
  tests/test_onnx_export.py::test_int8_saturation_is_judged_from_the_cpu (five CPUs forced),
  tests/test_onnx_export.py::test_the_int8_quantiser_reduces_the_range_only_where_the_kernels_saturate.
- oneDNN's instruction set (``common.env.onednn_isa``, held down by ``ONEDNN_MAX_CPU_ISA``): this module,
  test_cpu_capability_held_to_avx2_is_reported and, once oneDNN has spoken verbosely in the process,
  test_onednn_isa_after_oneDNN_spoke_verbosely_before; CI's AVX2 pass (.ci/run) runs the equivalence tests
  with both held to AVX2 and checks that they took effect: this module, test_the_held_cpu_took_effect.
- The CPU's name and flags where there is no /proc/cpuinfo (macOS, Windows) or an ARM one
  (``common.env.cpu_model_and_flags``): this module, test_cpu_flags_without_or_with_an_arm_cpuinfo.

Cores
- Threads per spawned worker, ``cores // nproc`` and at least one (a 1-core machine running
  ``--nproc 2``): ``common.launch.run_workers``: this module, test_worker_threads_follow_the_cores.

Optional packages
- An optional group of requirements.txt missing (DeepSpeed, the ONNX stack, peft): its sections SKIP
  with the install hint before any work (``common.env.require``, ``require_onnx_stack``): this module,
  test_sections_skip_without_their_optional_group (its hints match requirements.txt's groups:
  test_install_hints_name_each_group_of_requirements_txt); present: every other test of those sections. The
  set-up that installs each group on its own and names one that fails (``run.py``):
  tests/test_run_py.py::test_a_group_that_fails_to_install_is_named_and_the_rest_installs.
- fastmoe's real ``fmoe`` or ``common.fmoe`` (``common.fmoe.backend.fmoe_backend``): this module,
  test_fmoe_backend_real_or_ours.
- TensorRT usable, importing without a GPU, or missing (``s4_3_2_onnx.tensorrt_status``): this module,
  test_tensorrt_status_each_way.
- GPTQModel / AutoGPTQ / AutoAWQ importing or not (``common.gptqmodel_anchor.library_status``,
  ``common.env`` warnings): tests/test_env.py::test_gptqmodel_beside_an_older_torch_is_a_warning_both_ways,
  tests/test_env.py::test_autogptq_import_failure_is_a_warning; the anchors themselves run where
  GPTQModel imports (tests/test_quant_checkpoints.py::test_gptqmodel_quantises_the_trained_lm_to_our_codes,
  tests/test_quant_checkpoints.py::test_gptqmodels_awq_runs_beside_ours_and_reads_back; skipped with
  the install hint elsewhere).
- An onnxscript too old for torch's dynamo exporter: the TorchScript fallback, or one error naming both
  failures (``common.onnx_export.export_decoder``):
  tests/test_onnx_export.py::test_a_failing_dynamo_exporter_falls_back_and_is_named; dynamo:
  tests/test_onnx_export.py::test_export_matches_pytorch.
- The newest ``--opset`` the export can write: onnx's newest, or onnxscript's version converter's where
  that is lower (``common.onnx_export.writable_opsets``):
  tests/test_onnx_export.py::test_writable_opsets_takes_the_lower_of_onnx_and_the_converter (both forced),
  tests/test_onnx_export.py::test_the_newest_writable_opset_is_written_and_one_more_is_not.
- Installed versions outside the tested range (``common.tested_versions``, requirements-floor.txt):
  tests/test_tested_versions.py::test_warnings_below_the_floor_and_above_the_newest.
- Triton under its CPU interpreter or refused (``s7_2_2_gpu_shared_memory_attention.load_triton``):
  tests/test_tiled_attention.py::test_triton_kernel_equals_sdpa (the interpreter; the module skips
  with the hint where triton is missing).

Platform
- The ``--out`` lock: ``flock`` on POSIX, ``msvcrt.locking`` on Windows (``common.folder_lock``): this
  module, test_folder_lock_on_windows_simulated; POSIX:
  tests/test_folder_lock.py::test_a_folder_held_by_another_process_is_refused_until_that_process_dies.
- The package index's torch on Windows and macOS (the CPU build; CUDA torch on Windows from PyTorch's
  index), which ``run.py``'s torch step says:
  tests/test_run_py.py::test_the_torch_step_says_what_the_index_gives_on_each_platform.
- The pretrained model's training lock without ``fcntl`` (Windows): this module,
  test_pretrained_lm_trains_without_fcntl.
- glibc's malloc thresholds, a no-op elsewhere (``common.env.keep_freed_memory``): this module,
  test_keep_freed_memory_is_a_no_op_off_glibc; glibc:
  tests/test_env.py::test_keep_freed_memory_stops_page_faults_on_reuse.
- The harness's peak memory unit, ``ru_maxrss`` in KiB (Linux) or bytes (macOS): this module,
  test_script_process_peak_memory_unit_by_platform.
- The harness's process group: ``start_new_session``/``killpg``/SIGKILL/``wait4`` on POSIX,
  ``CREATE_NEW_PROCESS_GROUP``/``CTRL_BREAK_EVENT``/``kill``/psutil on Windows (``verify.process_group``):
  this module, test_script_process_on_windows_simulated and test_script_process_options_by_platform;
  POSIX: tests/test_verify.py::test_hang_killed_with_its_children.
- A clean stop by SIGBREAK (Ctrl-Break, the harness's CTRL_BREAK_EVENT) as by SIGTERM
  (``common.runner.stop_signals``): this module, test_sigbreak_stops_a_script_as_sigterm_does;
  SIGTERM: tests/test_signals.py::test_a_signal_saves_the_checkpoint_and_says_how_to_resume.
- The rendezvous without libuv on Windows (``USE_LIBUV=0``, ``common.training.setup_distributed``): this
  module, test_windows_rendezvous_without_libuv.
"""

import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from common import env
from tests.conftest import REPO_ROOT


def test_every_test_named_here_exists():
    text = " ".join(__doc__.split())
    elsewhere = re.findall(r"(tests/[\w/]+\.py)::(\w+)", text)
    here = re.findall(r"\b(test_\w+)", re.sub(r"tests/[\w/]+\.py(::\w+)?", "", text))
    named = elsewhere + [("tests/test_portability.py", name) for name in here]
    assert len(named) > 30
    for file, name in named:
        tree = ast.parse((REPO_ROOT / file).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, f"{file}::{name}"


# ----------------------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize(
    "cuda,mps,expected",
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_device_choice_forced(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Forced GPU")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    device, reason = env.choose_device("auto")
    assert device == expected and reason.startswith("auto:")
    for asked, present in (("cuda", cuda), ("mps", mps)):
        if present:
            assert env.choose_device(asked)[0] == asked
        else:
            with pytest.raises(env.SkipScript, match=f"--device {asked} asked for"):
                env.choose_device(asked)


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_dtype_choice_forced(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert env.choose_dtype("cuda")[0] == expected
    assert env.choose_dtype("cpu")[0] == torch.float32


@pytest.mark.parametrize(
    "bf16,fp16,expected", [(True, True, "bf16, fp16"), (True, False, "bf16"), (False, False, "none")]
)
def test_native_half_kinds_forced(monkeypatch, bf16, fp16, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16)
    assert env.cpu_half_kernels() == expected


def test_int4_rules_by_device():
    from common.quant import QuantLinear
    from common.quant_runtime import int4_refusal

    layer = QuantLinear(64, 24, bits=4, group_size=32)  # 24 outputs: a multiple of 8, not of 16
    assert "not a multiple of 16" in int4_refusal(layer, "cpu", torch.float32)
    assert int4_refusal(layer, "cuda", torch.bfloat16) is None
    assert "bf16 activations" in int4_refusal(layer, "cuda", torch.float32)
    assert int4_refusal(layer, "mps", torch.float32) == "no int4 kernel on mps"


# ----------------------------------------------------------------------------- CPU instruction sets


def test_cpu_capability_held_to_avx2_is_reported():
    """ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 take effect, and the environment report says
    which kernels ran."""
    code = "import json; from common.env import environment_report as r; print(json.dumps(r()['torch']))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    import json

    held = json.loads(out.stdout.strip().splitlines()[-1])
    assert held["cpu_capability"] == "AVX2"
    assert held["onednn_isa"] == "Intel AVX2" and held["cpu_half"] == "none"  # no bf16 kernels below AVX-512
    assert held["held_by"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # and says why
    here = env.environment_report()
    assert here["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    from verify.report import format_markdown

    shown = {**here, "torch": {**here["torch"], "held_by": held["held_by"]}}
    page = format_markdown({"environment": shown, "scripts": [], "summary": {}, "run": {}})
    assert "held by ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2" in page
    assert "held by    ATEN_CPU_CAPABILITY=avx2" in env.format_report(shown)
    if not {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"} & set(os.environ):
        assert "held by" not in env.format_report(here)


@pytest.mark.skipif(
    not {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"} & set(os.environ),
    reason="runs where CI holds the CPU down (.ci/run: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)",
)
def test_the_held_cpu_took_effect():
    """Under CI's AVX2 pass: torch's and oneDNN's kernels are the ones asked for, so that pass tests them."""
    if "ATEN_CPU_CAPABILITY" in os.environ:
        assert torch.backends.cpu.get_cpu_capability() == os.environ["ATEN_CPU_CAPABILITY"].upper()
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        isa = env.onednn_isa()
        assert isa and os.environ["ONEDNN_MAX_CPU_ISA"].replace("_", " ").lower() in isa.lower(), isa


def test_onednn_isa_after_oneDNN_spoke_verbosely_before():
    """oneDNN prints its isa: line once per process; a later call names the convolution's kernel."""
    env.onednn_isa()
    later = env.onednn_isa()
    assert later is not None and later.startswith("jit:"), later


def test_install_hints_name_each_group_of_requirements_txt():
    """The SKIP hints of the optional groups install what requirements.txt's groups hold."""
    import run

    _, groups = run.requirement_groups((REPO_ROOT / "requirements.txt").read_text())
    for group, names in (("deepspeed", ["deepspeed"]), ("onnx", list(env.ONNX_STACK)), ("peft", ["peft"])):
        wanted = [re.split(r"[<>=!~ ]", r)[0] for r in groups[group]]
        for name in names:
            hint = env.INSTALL_HINTS[name]
            assert f"pip install {' '.join(wanted)} (requirements.txt's [{group}] group" in hint, hint


def test_cpu_flags_without_or_with_an_arm_cpuinfo(monkeypatch, tmp_path):
    def no_cpuinfo(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(env, "open", no_cpuinfo, raising=False)
    monkeypatch.setattr(env.platform, "processor", lambda: "Apple M2")
    assert env.cpu_model_and_flags() == ("Apple M2", [])
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 crc32\n")
    real_open = open
    monkeypatch.setattr(env, "open", lambda path, *a, **k: real_open(arm, *a, **k), raising=False)
    assert env.cpu_model_and_flags() == ("Apple M2", ["asimd", "bf16", "sve"])


# ----------------------------------------------------------------------------- cores


def _threads(ctx) -> int:
    return torch.get_num_threads()


@pytest.mark.parametrize("cores,each", [(1, 1), (None, 1), (8, 4)])
def test_worker_threads_follow_the_cores(monkeypatch, cores, each):
    from common.launch import run_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert run_workers(_threads, 2, timeout=120) == [each, each]


# ----------------------------------------------------------------------------- optional packages


@pytest.mark.parametrize(
    "module,missing,group",
    [
        ("ch04_transformer_moe.s4_3_2_deepspeed", "deepspeed", "deepspeed"),
        ("ch06_distributed_moe.s6_4_2_deepspeed_moe_core", "deepspeed", "deepspeed"),
        ("ch06_distributed_moe.s6_4_4_deepspeed_training", "deepspeed", "deepspeed"),
        ("ch04_transformer_moe.s4_3_2_onnx", "onnxruntime", "onnx"),
        ("ch07_deployment.s7_3_3_edge_deployment", "onnxscript", "onnx"),
        ("ch07_deployment.s7_4_4_combined", "onnx", "onnx"),
        ("ch04_transformer_moe.s4_3_3_low_rank", "peft", "peft"),
    ],
)
def test_sections_skip_without_their_optional_group(monkeypatch, tmp_path, module, missing, group):
    """A group of requirements.txt that failed to install (run.py names it) costs only its sections:
    each SKIPs before any work, with the reason and the hint that installs the group."""
    import importlib

    script = importlib.import_module(module)
    monkeypatch.setitem(sys.modules, missing, None)  # import <missing> raises ImportError
    with pytest.raises(env.SkipScript, match=f"optional package '{missing}' is not usable") as e:
        script.main(["--quick", "--out", str(tmp_path / "out")])
    assert f"requirements.txt's [{group}] group" in e.value.hint


def test_fmoe_backend_real_or_ours(monkeypatch):
    from common.fmoe.backend import fmoe_backend

    real = types.ModuleType("fmoe")
    real.__version__ = "1.1.0"
    monkeypatch.setitem(sys.modules, "fmoe", real)
    module, name = fmoe_backend()
    assert module is real and name.startswith("fastmoe 1.1.0")
    monkeypatch.setitem(sys.modules, "fmoe", None)
    module, name = fmoe_backend()
    assert module.__name__ == "common.fmoe" and "real fmoe not used" in name


def test_tensorrt_status_each_way(monkeypatch):
    import onnxruntime as ort

    from ch04_transformer_moe.s4_3_2_onnx import tensorrt_status

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    usable, why = tensorrt_status()
    assert usable is False and "does not import" in why
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tensorrt_status() == (False, "tensorrt imports but there is no CUDA GPU to build an engine on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "built without its TensorRT execution provider" in tensorrt_status()[1]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider"])
    assert tensorrt_status()[0] is True


# ----------------------------------------------------------------------------- platform


class _FakeMsvcrt(types.ModuleType):
    """``msvcrt.locking`` as Windows has it, over ``flock``: LK_NBLCK raises OSError when held."""

    LK_NBLCK = 2

    def __init__(self):
        super().__init__("msvcrt")
        self.calls = []

    def locking(self, fd, mode, nbytes):
        import fcntl

        self.calls.append((mode, nbytes))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise OSError(36, "Resource deadlock avoided") from e  # what msvcrt raises


def test_folder_lock_on_windows_simulated(monkeypatch, tmp_path):
    from common import folder_lock

    fake = _FakeMsvcrt()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    folder = tmp_path / "out"
    other = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR|os.O_CREAT);"
         " fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(folder / ".lock")],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    folder.mkdir()
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(folder_lock.FolderInUse, match="is in use by"):
            folder_lock.lock_folder(folder)
    finally:
        other.kill()
        other.wait()
    folder_lock.lock_folder(folder)
    folder_lock.release(folder)
    assert fake.calls == [(fake.LK_NBLCK, 1)] * 2


def test_pretrained_lm_trains_without_fcntl(monkeypatch, tmp_path):
    from common.pretrained import pretrained_lm

    monkeypatch.setitem(sys.modules, "fcntl", None)  # Windows: no fcntl
    model, _, info = pretrained_lm("test", cache=tmp_path, progress=False)
    assert info["name"] == "test" and not info["cached"] and sum(p.numel() for p in model.parameters()) > 0


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    for system in ("Darwin", "Windows"):
        monkeypatch.setattr(env.platform, "system", lambda system=system: system)
        assert env.keep_freed_memory() is False


def test_script_process_options_by_platform(monkeypatch):
    from verify import process_group

    assert process_group.popen_options() == {"start_new_session": True}
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    assert process_group.popen_options() == {"creationflags": 0x200}


STOPPABLE = textwrap.dedent(
    """
    import signal, sys, time
    if sys.argv[1] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    block = bytearray(64 * 2**20)  # 64 MiB resident
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("behaviour,code", [("stops", 143), ("ignore", -signal.SIGKILL)])
def test_script_process_on_windows_simulated(monkeypatch, tmp_path, behaviour, code):
    """Windows' branch run on Linux: the clean stop is ``send_signal(CTRL_BREAK_EVENT)`` (forced here to
    SIGTERM's number, so that a POSIX child receives it), the hard stop ``kill()``, the reaping
    ``poll()``, the peak memory psutil's."""
    from verify.process_group import ScriptProcess

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(
        subprocess, "CREATE_NEW_PROCESS_GROUP", 0, raising=False
    )  # 0: Popen accepts it on Linux
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", signal.SIGTERM, raising=False)
    proc = ScriptProcess([sys.executable, "-c", STOPPABLE, behaviour], stdout=subprocess.PIPE, text=True)
    assert proc.proc.stdout.readline().strip() == "ready"
    assert not proc.poll()
    proc.stop(grace=1.0)
    assert proc.returncode == code
    assert proc.peak_rss_mb > 64


@pytest.mark.parametrize("platform,scale", [("linux", 1024), ("darwin", 1)])
def test_script_process_peak_memory_unit_by_platform(monkeypatch, platform, scale):
    """``ru_maxrss`` is KiB on Linux and bytes on macOS (forced here over a real child's exit)."""
    from verify.process_group import ScriptProcess

    real_wait4 = os.wait4

    def wait4(pid, options):  # the child's real status, a ru_maxrss of 96 MiB in the platform's unit
        got, status, _ = real_wait4(pid, options)
        return got, status, types.SimpleNamespace(ru_maxrss=96 * 2**20 // scale)

    proc = ScriptProcess([sys.executable, "-c", "pass"])
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(os, "wait4", wait4)
    assert proc.wait() == 0 and proc.peak_rss_mb == 96.0


def test_sigbreak_stops_a_script_as_sigterm_does(monkeypatch, tmp_path):
    """Windows' SIGBREAK, forced to SIGUSR1's number here: the runner's clean stop, its exit code and
    the INTERRUPTED figures file."""
    import json
    import time

    from common.runner import run_script, stop_signals

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert stop_signals() == [signal.SIGTERM, signal.SIGUSR1]
    before = signal.getsignal(signal.SIGUSR1)

    def main(argv=None):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)
        raise AssertionError("the signal did not stop main")

    figures = tmp_path / "figures.json"
    with pytest.raises(SystemExit) as e:
        run_script(main, ["--json", str(figures)])
    assert e.value.code == 128 + signal.SIGUSR1
    assert json.loads(figures.read_text())["status"] == "INTERRUPTED"
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers given back


def test_windows_rendezvous_without_libuv(monkeypatch):
    from common.training import setup_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("USE_LIBUV", raising=False)
    setup_distributed("cpu")
    assert "USE_LIBUV" not in os.environ
    monkeypatch.setattr(sys, "platform", "win32")
    setup_distributed("cpu")
    assert os.environ["USE_LIBUV"] == "0"


def test_readme_points_to_this_list():
    assert "tests/test_portability.py" in Path(REPO_ROOT, "README.md").read_text()
