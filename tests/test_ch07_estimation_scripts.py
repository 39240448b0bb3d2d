"""The 7.2-7.3 scripts refuse bad flags before any work, with a one-line error (argparse: exit 2)."""

import importlib

import pytest

BAD_FLAGS = [
    ("s7_3_1_memory_requirements", ["--batch", "0"]),
    ("s7_3_1_memory_requirements", ["--preset", "huge"]),
    ("s7_3_1_compute_requirements", ["--mfu", "1.5"]),
    ("s7_3_1_compute_requirements", ["--seq", "-4"]),
    ("s7_3_2_latency_estimation", ["--new", "0"]),
    ("s7_3_2_throughput", ["--batches", "1,x"]),
    ("s7_3_2_throughput", ["--batches", "0,4"]),
    ("s7_3_2_throughput", ["--new", "1"]),
    ("s7_2_2_gpu_shared_memory_attention", ["--lengths", "0,128"]),
    ("s7_2_2_host_device_memory", ["--mbytes", "0"]),
    ("s7_2_2_instruction_sets", ["--n", "-1"]),
]


@pytest.mark.parametrize("module,argv", BAD_FLAGS, ids=[f"{m}:{' '.join(a)}" for m, a in BAD_FLAGS])
def test_bad_flags_exit_2(module, argv, capsys):
    main = importlib.import_module(f"ch07_deployment.{module}").main
    with pytest.raises(SystemExit) as e:
        main([*argv, "--device", "cpu"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
@pytest.mark.parametrize(
    "module, figure, predicted",
    [
        ("s7_3_1_compute_requirements", "bf16_train_step_speedup", "bf16_train_step_predicted_s"),
        ("s7_3_2_latency_estimation", "bf16_decode_speedup", "bf16_prefill_predicted_ms"),
    ],
)
def test_bf16_is_measured_beside_fp32_where_the_cpu_has_it(
    module, figure, predicted, native, monkeypatch, tmp_path
):
    """Forced both ways: oneDNN's answer decides whether the bf16 step/prefill/decode is measured."""
    import torch

    really_native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.delenv("BOOK_DTYPE", raising=False)
    main = importlib.import_module(f"ch07_deployment.{module}").main
    figures = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert (figure in figures) == (predicted in figures) == native
    if native:
        assert figures[predicted] > 0
    if native and really_native:  # the estimator at the measured bf16 rate: faster than fp32's prediction
        fp32 = predicted.replace("bf16_", "fp32_" if "prefill" in predicted else "")
        assert figures[predicted] < figures[fp32]  # (emulated bf16, forced here, is the slower one)
