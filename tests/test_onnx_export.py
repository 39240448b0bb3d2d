"""common.onnx_export: the exported decoder LM in onnxruntime gives PyTorch's logits (within 1e-4) at
any batch and sequence length, and ORT greedy decoding gives PyTorch's tokens."""

import numpy as np
import pytest
import torch

from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate
from common.onnx_export import ORT_GEMM_OPS, OrtLM, dynamic_axes_of, export_decoder, writable_opsets
from common.timing import gemm_share


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=101, context_length=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    return DecoderLM(DecoderConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize(
    "kw, dynamo",
    [(dict(), True), (dict(norm="layernorm", pos="learned", ffn="gelu", bias=True, n_kv_head=4), False)],
)
def test_export_matches_pytorch(tmp_path, kw, dynamo):
    model = tiny(**kw)
    path = str(tmp_path / "lm.onnx")
    info = export_decoder(model, path, dynamo=dynamo)
    assert info["exporter"] == ("dynamo" if dynamo else "torchscript") and info["bytes"] > 0
    axes = dynamic_axes_of(path)
    assert axes["input_ids"] == ["batch", "seq"] and axes["logits"][:2] == ["batch", "seq"]
    session = OrtLM(path)
    for shape in [(1, 1), (1, 7), (5, 32)]:
        x = torch.randint(0, 101, shape)
        with torch.no_grad():
            want = model(x)[0].numpy()
        assert np.abs(session(x) - want).max() < 1e-4, shape
    prompt = [3, 14, 15, 9]
    assert session.greedy(prompt, 12) == generate(model, [prompt], 12)[0]


def test_kernel_ms_names_the_matmuls(tmp_path):
    model = tiny()
    path = str(tmp_path / "lm.onnx")
    export_decoder(model, path)
    per_op = OrtLM(path, providers=["CPUExecutionProvider"]).kernel_ms(
        torch.randint(0, 101, (1, 32)), rounds=3
    )
    assert set(per_op) & set(ORT_GEMM_OPS), per_op  # the projections run as ORT's GEMM kernels
    assert "Softmax" in per_op and all(ms >= 0 for ms in per_op.values())


def test_gemm_share_separates_matmul_from_elementwise():
    # large enough that the product's time dwarfs what other threads of the test process may record
    # meanwhile (the profiler sees every thread; a 256x256 product once read 0.47 in the full suite)
    a = torch.randn(768, 768)
    assert gemm_share(lambda: a @ a) > 0.8
    assert gemm_share(lambda: (a * 2 + 1).relu()) == 0.0


def test_ort_decoder_evaluates_like_the_pytorch_model_and_its_files_are_counted(tmp_path):
    import os

    import onnx

    from common.lm_source import evaluate_lm, load_pretrained
    from common.model_files import onnx_bytes
    from common.onnx_export import OrtDecoder

    source = load_pretrained("test")
    path = str(tmp_path / "lm.onnx")
    export_decoder(source.model, path)
    ours = evaluate_lm(source.model, source.data, 8, 2)
    ort = evaluate_lm(OrtDecoder(OrtLM(path)), source.data, 8, 2, device="cpu")
    assert ort["tokens"] == ours["tokens"] and abs(ort["loss"] - ours["loss"]) < 1e-5
    # the weights moved to an external file still count
    external = str(tmp_path / "ext.onnx")
    onnx.save(onnx.load(path), external, save_as_external_data=True, location="weights.bin", size_threshold=0)
    on_disk = os.path.getsize(external) + os.path.getsize(tmp_path / "weights.bin")
    assert onnx_bytes(external) == on_disk > 4 * sum(p.numel() for p in source.model.parameters())


@pytest.mark.parametrize(
    "machine, flags, saturates",
    [
        ("x86_64", ["avx", "avx2", "fma"], True),  # an AVX2 laptop CPU (vpmaddubsw)
        ("x86_64", ["avx2", "avx512f"], True),  # AVX-512 without VNNI (Skylake-SP)
        ("x86_64", ["avx2", "avx512f", "avx512_vnni"], False),
        ("AMD64", ["avx2", "avx_vnni"], False),  # Windows' name for x86-64; AVX-VNNI (Alder Lake)
        ("aarch64", [], False),
    ],
)
def test_int8_saturation_is_judged_from_the_cpu(monkeypatch, machine, flags, saturates):
    import platform

    from common.onnx_export import int8_saturates

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert int8_saturates(flags) is saturates


@pytest.mark.parametrize("saturates", [True, False])
def test_the_int8_quantiser_reduces_the_range_only_where_the_kernels_saturate(monkeypatch, saturates):
    quantization = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime is an optional group")
    from common import onnx_export

    seen = {}
    monkeypatch.setattr(quantization, "quantize_dynamic", lambda fp, q, **kw: seen.update(kw))
    monkeypatch.setattr(onnx_export, "int8_saturates", lambda: saturates)
    settings = onnx_export.quantize_dynamic_int8("fp.onnx", "q.onnx")
    assert seen["reduce_range"] is saturates
    assert f"reduce_range={saturates}" in settings["onnxruntime_quantize"]


def _failing_dynamo(real_export, fallback_fails: bool):
    """torch.onnx.export whose dynamo exporter fails as with onnxscript < 0.6 beside torch 2.13."""

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise ModuleNotFoundError("No module named 'onnxscript._framework_apis.torch_2_11'")
        if fallback_fails:
            raise RuntimeError(
                "Exporting the operator 'aten::rms_norm' to ONNX opset version 17 is not supported"
            )
        return real_export(*args, dynamo=False, **kwargs)

    return export


@pytest.mark.parametrize("fallback_fails", [False, True], ids=["fallback-exports", "both-fail"])
def test_a_failing_dynamo_exporter_falls_back_and_is_named(monkeypatch, tmp_path, fallback_fails):
    """The dynamo exporter failing (an onnxscript too old for torch): the TorchScript fallback, with the
    reason recorded; both failing, one error that names the first failure, the one to fix."""
    model = tiny(norm="layernorm", pos="learned", ffn="gelu", bias=True, n_kv_head=4)
    monkeypatch.setattr(torch.onnx, "export", _failing_dynamo(torch.onnx.export, fallback_fails))
    path = str(tmp_path / "lm.onnx")
    if fallback_fails:
        with pytest.raises(
            RuntimeError, match=r"dynamo exporter failed \(ModuleNotFoundError.*torch_2_11'\)"
        ):
            export_decoder(model, path)
        return
    info = export_decoder(model, path)
    assert info["exporter"] == "torchscript" and "torch_2_11" in info["fallback_reason"]


def test_the_newest_writable_opset_is_written_and_one_more_is_not(tmp_path):
    """--opset's upper end: the newest opset writable_opsets names exports; above it, where onnx knows
    more opsets than onnxscript's version converter, the export fails (what the flag check prevents)."""
    import onnx

    low, newest, why = writable_opsets()
    assert low == 7 and newest <= onnx.defs.onnx_opset_version()
    info = export_decoder(tiny(), str(tmp_path / "newest.onnx"), opset=newest)
    assert info["opset"] == newest and info["exporter"] == "dynamo", info
    if newest < onnx.defs.onnx_opset_version():
        assert "version converter" in why
        with pytest.raises(onnx.checker.ValidationError):
            export_decoder(tiny(), str(tmp_path / "above.onnx"), opset=newest + 1)


@pytest.mark.parametrize(
    "converter", [20, None, 99], ids=["converter-lower", "no-converter-bound", "onnx-lower"]
)
def test_writable_opsets_takes_the_lower_of_onnx_and_the_converter(monkeypatch, converter):
    import onnx
    from onnxscript.version_converter import _version_converter

    if converter is None:
        monkeypatch.delattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET")
    else:
        monkeypatch.setattr(_version_converter, "SUPPORTED_MAX_ONNX_OPSET", converter)
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 30)
    low, newest, why = writable_opsets()
    assert newest == (20 if converter == 20 else 30)
    assert ("version converter" in why) == (converter == 20) and ("onnx" in why)
