"""The environment: device and dtype choice with the reason, seeding, versions, known troubles.

    python -m common.env            # a readable report
    python -m common.env --json     # the same as JSON

The report names every optional package with its installed version and whether it really
imports (auto-gptq 0.7.1, for one, installs but fails to import with transformers 5), and turns
the known version incompatibilities below into warnings.  What a package logs while it is imported
is captured (:func:`import_quietly`), not left on stderr after the report: DeepSpeed's "Setting
accelerator to CPU" is what a machine without a GPU should get and is dropped; any other warning
it logs joins the report's warnings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import platform
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import SkipScript
from common.tested_versions import installed_version, range_warnings, release

# import name -> distribution name on the package index
PACKAGES = {
    "numpy": "numpy",
    "torch": "torch",
    "transformers": "transformers",
    "deepspeed": "deepspeed",
    "tree": "dm-tree",
    "fmoe": "fastmoe",
    "auto_gptq": "auto-gptq",
    "awq": "autoawq",
    "gptqmodel": "gptqmodel",
    "peft": "peft",
    "optimum": "optimum",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "tensorrt": "tensorrt",
    "sklearn": "scikit-learn",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "matplotlib": "matplotlib",
}

ONNX_STACK = ("onnx", "onnxscript", "onnxruntime")  # what ONNX export and inference import
HOLD_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # torch's and oneDNN's kernel ceilings

# the loggers that packages write to while they are imported, and the messages that are no trouble
IMPORT_LOGGERS = {"deepspeed": "DeepSpeed"}
BENIGN_IMPORT_LOG = re.compile(r"Setting accelerator to CPU")

_GROUP_HINT = (
    "pip install {} (requirements.txt's [{}] group, with its lower bounds; python3 run.py setup retries it)"
)
INSTALL_HINTS = {
    "deepspeed": _GROUP_HINT.format("deepspeed dm-tree", "deepspeed"),
    **{name: _GROUP_HINT.format("onnx onnxscript onnxruntime", "onnx") for name in ONNX_STACK},
    "peft": _GROUP_HINT.format("peft accelerate", "peft"),
    "fmoe": "fastmoe builds only against CUDA: see requirements-gpu.txt",
    "auto_gptq": "pip install auto-gptq (needs CUDA and transformers<5; see requirements-gpu.txt)",
    "awq": "pip install autoawq (deprecated; pinned to torch 2.6; see requirements-gpu.txt)",
    "tensorrt": "pip install tensorrt (NVIDIA GPUs only; see requirements-gpu.txt)",
    "gptqmodel": "pip install --no-deps gptqmodel==7.7.0 && pip install -r requirements-anchors.txt",
}


# ----------------------------------------------------------------------------- device, dtype, seed


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """Return (device, reason).  ``auto`` prefers cuda, then mps, then cpu.

    Asking for a device that is not there raises :class:`SkipScript`: the script cannot run as asked.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        if has_cuda:
            return "cuda", f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if has_mps:
            return "mps", "auto: no CUDA, Apple MPS is available"
        return "cpu", "auto: no CUDA or MPS device found"
    if requested == "cuda" and not has_cuda:
        raise SkipScript(
            "--device cuda asked for, but torch sees no CUDA device",
            "install a CUDA build of torch on a machine with an NVIDIA GPU",
        )
    if requested == "mps" and not has_mps:
        raise SkipScript("--device mps asked for, but torch sees no MPS device", "needs Apple silicon")
    if requested not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu, cuda or mps")
    return requested, f"asked for {requested}"


def choose_dtype(device: str) -> tuple[object, str]:
    """Return (torch dtype for autocast/compute, reason): bf16 where the hardware does it well."""
    import torch

    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float16, "CUDA device without bf16: fp16 (use a GradScaler when training)"
    if device == "mps":
        return torch.float16, "MPS: fp16"
    return torch.float32, "CPU: fp32 (bf16 autocast on CPU is slow without AMX and loses precision)"


DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bf16" (the names of the ``--dtype`` flag)."""
    return {v: k for k, v in DTYPE_NAMES.items()}[str(dtype).removeprefix("torch.")]


def torch_dtype(name: str):
    """ "bf16" -> torch.bfloat16."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN: AVX512_BF16 or AMX); without, torch emulates it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_half_kernels() -> str:
    """Which 16-bit types oneDNN multiplies natively on this CPU ("bf16, fp16", "bf16" or "none"): bf16
    with AVX512_BF16 or AMX, fp16 with AVX512_FP16 or AMX-FP16. DeepSpeed's CPU accelerator accepts fp16
    only where oneDNN has it (``s4_3_2_deepspeed`` then trains in fp16); without, torch emulates both."""
    import torch

    native = {"bf16": cpu_bf16_native(), "fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}
    return ", ".join(name for name, yes in native.items() if yes) or "none"


def held_text(held: dict) -> str:
    """``ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2``: the kernel ceilings a report ran under."""
    return ", ".join(f"{k}={v}" for k, v in held.items())


def onednn_isa() -> str | None:
    """The instruction set oneDNN dispatches to, in its own words ("Intel AVX2", "Intel AVX10.1 and
    Intel AMX with bfloat16 and 8-bit integer support"; ``ONEDNN_MAX_CPU_ISA`` holds it down): the
    ``isa:`` line of its verbose output for one small convolution, read from this process's stdout;
    None where torch has no oneDNN."""
    import tempfile

    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    with tempfile.TemporaryFile() as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)  # oneDNN prints from C, to file descriptor 1
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(torch.zeros(8, 16, 32, 32), torch.zeros(32, 16, 3, 3))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    m = re.search(r"^onednn_verbose,.*?isa:(.+)$", text, re.M)  # printed at the first verbose call
    if m is None:  # oneDNN spoke verbosely before in this process: the convolution's kernel says it
        m = re.search(r"^onednn_verbose,.*?,convolution,(jit:[\w]+)", text, re.M)
    return m.group(1).strip() if m else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)  # also seeds every CUDA device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    PyTorch's CPU allocator keeps no cache: it asks malloc for every tensor and frees it when the
    tensor dies. glibc serves blocks above its mmap threshold (at most 32 MiB by default) with a fresh
    ``mmap`` and unmaps them on free, so every large tensor, a training step's activations and
    gradients included, starts on untouched pages and pays a page fault per 4 KiB on first write
    (``tests/test_env.py`` counts them; the benchmarks' ``--system-malloc`` times the difference).
    Raising the mmap and trim thresholds keeps such blocks in the heap for the next tensor (what
    jemalloc or tcmalloc, which PyTorch's CPU performance guide suggests preloading, do anyway).
    Freed memory then stays with the process until it exits, and peak use grows as freed blocks wait
    for reuse: PyTorch's 64-byte-aligned requests need slightly more than the block of the same size
    just freed, so the heap can grow by a few blocks before it settles (the test counts the rounds;
    the verify reports' peak RSS column shows what this costs the book's scripts).

    Returns True where it took effect (glibc), False elsewhere (macOS, Windows, musl): a no-op there.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES - 1)
    )


def import_quietly(name: str, log: list[str] | None = None):
    """Import ``name``; the warnings its logger emits during the import go to ``log``, not stderr.

    Only packages listed in :data:`IMPORT_LOGGERS` are affected; messages matching
    :data:`BENIGN_IMPORT_LOG` are dropped.  Later log records of the package are untouched.
    """
    logger_name = IMPORT_LOGGERS.get(name.split(".")[0])
    if logger_name is None:
        return importlib.import_module(name)

    def capture(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if log is not None and not BENIGN_IMPORT_LOG.search(message):
            log.append(message)
        return False

    logger = logging.getLogger(logger_name)  # the logger the package configures on import
    logger.addFilter(capture)
    try:
        return importlib.import_module(name)
    finally:
        logger.removeFilter(capture)


def require_onnx_stack() -> None:
    """:class:`SkipScript` with the reason and the install hint unless onnx, onnxscript and onnxruntime
    all import (the ONNX sections need the three)."""
    for name in ONNX_STACK:
        require(name)


def require(name: str, hint: str | None = None):
    """Import an optional package or raise :class:`SkipScript` with the reason and the install hint."""
    try:
        return import_quietly(name)
    except BaseException as e:  # noqa: BLE001 - some packages raise SystemExit or odd errors on import
        if isinstance(e, KeyboardInterrupt):
            raise
        hint = hint or INSTALL_HINTS.get(name) or f"pip install {PACKAGES.get(name, name)}"
        raise SkipScript(f"optional package {name!r} is not usable: {type(e).__name__}: {e}", hint) from e


# ----------------------------------------------------------------------------- the report


def package_status(import_name: str) -> dict:
    """Installed version and whether the package actually imports (with the error if not)."""
    dist = PACKAGES.get(import_name, import_name)
    version = installed_version(dist)
    info = {"name": dist, "import": import_name, "version": version, "imports": False, "error": None}
    if version is None:
        info["error"] = "not installed"
        return info
    log: list[str] = []
    try:
        with contextlib.redirect_stdout(sys.stderr):  # some packages log to stdout on import
            import_quietly(import_name, log)
        info["imports"] = True
        if log:
            info["import_warnings"] = log
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).strip().splitlines()
        info["error"] = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300]
    return info


def import_status(import_name: str) -> str:
    """``"imports"``, or ``"does not import: <why>"`` (not installed, or the import's error)."""
    info = package_status(import_name)
    return "imports" if info["imports"] else f"does not import: {info['error']}"


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """``(CPU model, the SIMD and matrix flags the book's branches look at)`` from /proc/cpuinfo where
    there is one (Linux), else the platform's processor name and no flags."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        if m:
            wanted = {
                "sse4_2",
                "avx",
                "avx2",
                "fma",
                "avx512f",
                "avx512_bf16",
                "avx512_vnni",
                "avx512_fp16",
                "avx_vnni",
                "amx_bf16",
                "amx_tile",
                "amx_int8",
                "amx_fp16",
                "neon",
                "asimd",
                "sve",
                "bf16",
            }
            flags = sorted(set(m.group(1).split()) & wanted)
    except OSError:
        pass
    return model, flags


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _torch_info() -> dict:
    try:
        import torch
    except ImportError as e:
        return {"version": None, "error": str(e)}
    info = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_half": cpu_half_kernels(),
        "onednn_isa": onednn_isa(),
        # the settings that hold the kernels below what the CPU has (a laptop CPU simulated)
        "held_by": {k: os.environ[k] for k in HOLD_VARIABLES if os.environ.get(k)},
        "threads": torch.get_num_threads(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "name": p.name,
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}",
                }
            )
    return info


@dataclass
class Incompatibility:
    """One known trouble: ``applies(report)`` says whether it bites in this environment."""

    applies: Callable[[dict], bool]
    message: Callable[[dict], str]


def _v(r: dict, name: str) -> tuple[int, ...]:
    return release(r["packages"].get(name, {}).get("version"))


def _imports(r: dict, name: str) -> bool:
    return bool(r["packages"].get(name, {}).get("imports"))


def _installed(r: dict, name: str) -> bool:
    return r["packages"].get(name, {}).get("version") is not None


INCOMPATIBILITIES = [
    Incompatibility(
        lambda r: _v(r, "numpy") >= (2,) and () < _v(r, "torch") < (2, 3),
        lambda r: (
            f"NumPy {r['packages']['numpy']['version']} with torch {r['packages']['torch']['version']}: "
            "torch before 2.3 was built against NumPy 1.x and breaks on NumPy 2 "
            "(the book hit it with torch 1.10.1); pip install 'numpy<2' or a newer torch"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "transformers") and () < _v(r, "torch") < (2, 1),
        lambda r: (
            "transformers' pretrained models need torch 2.1 or newer; "
            f"torch is {r['packages']['torch']['version']}"
        ),
    ),
    Incompatibility(
        lambda r: (_installed(r, "auto_gptq") or _installed(r, "awq")) and _v(r, "torch")[:2] != (2, 3),
        lambda r: (
            "the book's quantization runs (auto-gptq/autoawq kernels) used torch 2.3.1; with torch "
            f"{r['packages']['torch']['version']} their compiled kernels may not load"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "auto_gptq") and not _imports(r, "auto_gptq"),
        lambda r: (
            f"auto-gptq {r['packages']['auto_gptq']['version']} is installed but does not import "
            f"({r['packages']['auto_gptq']['error']}): auto-gptq 0.7.1 needs transformers<5 (it imports "
            f"no_init_weights, which transformers 5 moved); transformers is "
            f"{r['packages']['transformers']['version']}. Chapter 7 uses the book's own GPTQ instead"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "awq") and _v(r, "torch")[:2] != (2, 6),
        lambda r: (
            f"autoawq {r['packages']['awq']['version']} is pinned to torch 2.6 and deprecated; "
            f"torch is {r['packages']['torch']['version']}. Chapter 7 uses the book's own AWQ"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "awq") and not _imports(r, "awq"),
        lambda r: f"autoawq is installed but does not import ({r['packages']['awq']['error']})",
    ),
    Incompatibility(
        lambda r: _installed(r, "gptqmodel") and _v(r, "torch") < (2, 14, 1),
        lambda r: (
            f"gptqmodel {r['packages']['gptqmodel']['version']} declares torch>=2.14.1 and torch is "
            f"{r['packages']['torch']['version']}: installed with --no-deps beside it "
            "(requirements-anchors.txt) it quantises on a CPU (s7_4_1_gptq); a plain pip install "
            "replaces the CPU torch with 2.14.1 and CUDA wheels. On a CPU it needs "
            "GPTQMODEL_CPU_WORKERS at most the cores torch uses (s7_4_1_gptq sets it); its AWQ runs only "
            "in fp16/bf16, and its fp32 loader (TorchFusedLinear) drops the zero points, so the script "
            "reads the checkpoint itself (common.quant_checkpoints)"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "gptqmodel") and _installed(r, "peft") and _v(r, "optimum") < (1, 24),
        lambda r: (
            f"gptqmodel {r['packages']['gptqmodel']['version']} beside peft "
            f"{r['packages']['peft']['version']} and "
            + (f"optimum {r['packages']['optimum']['version']}" if _installed(r, "optimum") else "no optimum")
            + ": "
            "peft's LoRA then refuses to build any adapter (ImportError: gptqmodel requires optimum version "
            "1.24.0 or higher; s4_3_3_low_rank fails, measured with peft 0.21.2); "
            "pip install --no-deps 'optimum>=1.24' (requirements-anchors.txt)"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "deepspeed") and not _installed(r, "tree"),
        lambda r: (
            "deepspeed is installed without dm-tree, which the book's DeepSpeed setup needed: "
            "pip install dm-tree"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "deepspeed") and not _imports(r, "deepspeed"),
        lambda r: f"deepspeed is installed but does not import ({r['packages']['deepspeed']['error']})",
    ),
    Incompatibility(
        lambda r: _installed(r, "deepspeed") and _v(r, "torch") >= (2, 13),
        lambda r: (
            f"deepspeed {r['packages']['deepspeed']['version']}'s ZeRO calls all_gather_into_tensor and "
            "reduce_scatter_tensor at every step, and the installed torch "
            f"({r['packages']['torch']['version']}) deprecates both: a FutureWarning each time (the book's "
            "workers show it once)"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "fmoe") and not _imports(r, "fmoe"),
        lambda r: (
            f"fastmoe is installed but does not import ({r['packages']['fmoe']['error']}); "
            "chapter 6 falls back to the book's pure-PyTorch FMoE"
        ),
    ),
    Incompatibility(
        lambda r: _installed(r, "tensorrt") and not r["torch"].get("gpus"),
        lambda r: "tensorrt is installed but there is no CUDA GPU: TensorRT sections skip",
    ),
    Incompatibility(
        lambda r: _v(r, "torch") >= (2, 9) and _installed(r, "onnx") and not _installed(r, "onnxscript"),
        lambda r: (
            "torch's ONNX exporter (dynamo=True, the default since torch 2.9) needs onnxscript: "
            "pip install onnxscript"
        ),
    ),
]


def environment_report() -> dict:
    """Everything a reader or maintainer needs to know about this machine, plus version warnings."""
    cpu_model, simd = cpu_model_and_flags()
    report = {
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_flags": simd,
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": _torch_info(),
        "packages": {},
    }
    for import_name in PACKAGES:
        if import_name == "torch":
            continue
        report["packages"][import_name] = package_status(import_name)
    report["packages"]["torch"] = {
        "name": "torch",
        "import": "torch",
        "version": report["torch"]["version"],
        "imports": report["torch"]["version"] is not None,
        "error": None,
    }
    report["warnings"] = [inc.message(report) for inc in INCOMPATIBILITIES if inc.applies(report)]
    report["warnings"] += range_warnings()  # outside the versions the book was run with
    report["warnings"] += [
        f"{p['name']} warned on import: {w}"
        for p in report["packages"].values()
        for w in p.get("import_warnings", [])
    ]
    return report


def format_report(r: dict) -> str:
    t = r["torch"]
    lines = [
        "Environment",
        f"  OS         {r['os']}  ({r['platform']})",
        f"  CPU        {r['cpu']}, {r['cores']} cores; SIMD: {', '.join(r['cpu_flags']) or 'unknown'}",
        f"  memory     {r['memory_gib']} GiB",
        f"  Python     {r['python']}",
        f"  torch      {t.get('version')}  (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}, "
        f"CPU kernels {t.get('cpu_capability')}, native 16-bit {t.get('cpu_half', '?')}, "
        f"{t.get('threads')} threads)",
        f"  oneDNN     {t.get('onednn_isa') or 'not in this torch'}",
    ]
    if t.get("held_by"):
        lines.append(f"  held by    {held_text(t['held_by'])}")
    for g in t.get("gpus", []):
        lines.append(f"  GPU        {g['name']}, {g['memory_gib']} GiB, compute capability {g['capability']}")
    if not t.get("gpus"):
        lines.append("  GPU        none")
    lines.append("Packages")
    for name, p in r["packages"].items():
        if name == "torch":
            continue
        if p["version"] is None:
            state = "not installed"
        elif p["imports"]:
            state = f"{p['version']}  imports"
        else:
            state = f"{p['version']}  DOES NOT IMPORT: {p['error']}"
        lines.append(f"  {p['name']:<13}{state}")
    lines.append("Warnings" if r["warnings"] else "Warnings: none")
    lines += [f"  - {w}" for w in r["warnings"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
