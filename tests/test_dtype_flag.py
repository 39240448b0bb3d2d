"""``--dtype``: every section that trains or decodes a model takes it (``common.runner.add_dtype_flag``);
the others are listed here with the reason they do not.

The default stays fp32 on a CPU (``auto``: bf16 only on a GPU that supports it), so reports compare
across machines; ``BOOK_DTYPE`` sets it for a whole book run.  The branches that depend on the machine
(``common.env.choose_dtype``'s answer, ``common.env.cpu_bf16_native``) are forced both ways here.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from common import env
from common.runner import DTYPE_ENV, add_dtype_flag, parse_args, script_parser
from tests.conftest import REPO_ROOT
from verify.harness import discover

# the sections without --dtype, and why
NO_DTYPE = {
    "ch04_transformer_moe/s4_1_0_environment.py": "reports the environment; no model",
    "ch04_transformer_moe/s4_2_1_moe.py": "checks a layer's forward and gradients against its reference loop",
    "ch04_transformer_moe/s4_2_2_switch_router.py": "routes fixed inputs; no training loop",
    "ch04_transformer_moe/s4_2_3_gshard_top2.py": "routes fixed inputs; no training loop",
    "ch04_transformer_moe/s4_3_2_deepspeed.py": "runs ZeRO in fp32, bf16 and fp16 itself, side by side",
    "ch04_transformer_moe/s4_3_2_onnx.py": "fp32 and int8 ONNX graphs, what onnxruntime's CPU runs",
    "ch04_transformer_moe/s4_3_3_unstructured_pruning.py": "prunes and evaluates; no training or decoding",
    "ch06_distributed_moe/s6_4_1_fastmoe_core.py": "layer equivalence with fastmoe's semantics",
    "ch06_distributed_moe/s6_4_2_deepspeed_moe_core.py": "gate and layer equivalence with DeepSpeed",
    "ch06_distributed_moe/s6_5_all_to_all_cost.py": "times communication, not a model",
    "ch07_deployment/s7_2_2_gpu_shared_memory_attention.py": "a GPU kernel study",
    "ch07_deployment/s7_2_2_host_device_memory.py": "times copies, not a model",
    "ch07_deployment/s7_2_2_instruction_sets.py": "times every dtype's matmul itself",
    "ch07_deployment/s7_3_1_memory_requirements.py": "measures fp32 training memory against its formula",
    "ch07_deployment/s7_3_3_edge_deployment.py": "ONNX Runtime in fp32 and int8 against eager fp32",
    "ch07_deployment/s7_4_1_awq.py": "quantises in fp32 (the scales search compares fp32 outputs)",
    "ch07_deployment/s7_4_1_gptq.py": "quantises in fp32 (GPTQ's Hessian and its inverse need it)",
    "ch07_deployment/s7_4_2_magnitude_pruning.py": "prunes and evaluates; no training or decoding",
}
SCRIPTS = discover(REPO_ROOT)


@pytest.mark.parametrize("path", SCRIPTS)
def test_every_section_that_trains_or_decodes_takes_dtype(path):
    text = (REPO_ROOT / path).read_text()
    takes = "add_dtype_flag(parser" in text
    assert takes != (path in NO_DTYPE), (
        f"{path}: {'takes --dtype but is listed in NO_DTYPE' if takes else 'has no --dtype and no reason'}"
    )


def _parser():
    parser = script_parser()
    add_dtype_flag(parser)
    return parser


def test_default_is_fp32_on_a_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch, tmp_path):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    args = parse_args(_parser(), ["--device", "cpu", "--out", str(tmp_path)])
    assert args.dtype == "fp32" and "CPU" in args.dtype_reason
    # the GPU's answer, forced: choose_device says cuda, choose_dtype says bf16 (or fp16 without it)
    monkeypatch.setattr(env, "choose_device", lambda name: ("cuda", "forced"))
    monkeypatch.setattr(env, "choose_dtype", lambda device: (torch.bfloat16, "CUDA device supports bf16"))
    assert parse_args(_parser(), ["--out", str(tmp_path)]).dtype == "bf16"
    monkeypatch.setattr(env, "choose_dtype", lambda device: (torch.float16, "CUDA device without bf16"))
    args = parse_args(_parser(), ["--out", str(tmp_path)])
    assert args.dtype == "fp32" and "no fp16" in args.dtype_reason  # a script without a loss scaler
    parser = script_parser()
    add_dtype_flag(parser, fp16=True)
    assert parse_args(parser, ["--out", str(tmp_path)]).dtype == "fp16"


def test_environment_sets_the_default_and_the_flag_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(DTYPE_ENV, "bf16")
    args = parse_args(_parser(), ["--device", "cpu", "--out", str(tmp_path)])
    assert args.dtype == "bf16" and DTYPE_ENV in args.dtype_reason
    assert (
        parse_args(_parser(), ["--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path)]).dtype == "fp32"
    )
    monkeypatch.setenv(DTYPE_ENV, "fp64")
    with pytest.raises(SystemExit) as e:
        parse_args(_parser(), ["--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_bf16_on_a_cpu_without_it_says_it_is_emulated(monkeypatch, tmp_path):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    for native in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        args = parse_args(_parser(), ["--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path)])
        assert args.dtype == "bf16" and ("emulated" in args.dtype_reason) == (not native)


def test_a_bad_dtype_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--dtype", "fp64"])
    assert e.value.code == 2
    assert isinstance(_parser(), argparse.ArgumentParser)


@pytest.mark.parametrize(
    "module, figure",
    [
        ("ch04_transformer_moe.s4_2_4_deepseek_moe", "fit_loss_bias"),  # a training loop under autocast
        ("ch07_deployment.s7_4_3_knowledge_distillation", "distilled_val_loss"),  # common.distill
        ("ch07_deployment.s7_3_2_throughput", "b1_meas_tok_s"),  # decoding with bf16 weights
    ],
)
def test_sections_run_in_bf16(module, figure, tmp_path):
    fig = tmp_path / "figures.json"
    cmd = [sys.executable, "-m", module, "--quick", "--device", "cpu", "--dtype", "bf16"]
    cmd += ["--json", str(fig), "--out", str(tmp_path / "out")]
    environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compute dtype: bf16 (asked for" in proc.stdout
    figures = json.loads(fig.read_text())["figures"]
    assert figures["dtype"] == "bf16" and figures[figure] == figures[figure]  # not NaN


def test_training_under_bf16_autocast_runs_its_matmuls_in_bf16():
    from common.models.decoder import DecoderConfig, DecoderLM
    from common.training import autocast_for

    model = DecoderLM(
        DecoderConfig(vocab_size=64, context_length=16, n_layer=1, d_model=32, n_head=2, n_kv_head=2)
    )
    idx = torch.randint(0, 64, (2, 16))
    with autocast_for("cpu", "bf16"):
        logits, _ = model(idx)
    assert logits.dtype == torch.bfloat16
    with autocast_for("cpu", "fp32"):
        assert model(idx)[0].dtype == torch.float32
