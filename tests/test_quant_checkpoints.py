"""common.quant_checkpoints: the gptq and AWQ gemm checkpoint formats (AutoGPTQ's, AutoAWQ's and
GPTQModel's) read back into our quantised weights, bit layouts written out by hand; and, where GPTQModel
imports, its GPTQ and its AWQ of the same model with the same settings beside ours."""

import json

import pytest
import torch
from safetensors.torch import save_file

from common.quant import rtn
from common.quant_checkpoints import (
    as_decoder_norms,
    as_decoder_weights,
    read_awq_checkpoint,
    read_gptq_checkpoint,
    unpack_int32,
)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """(K, N) 4-bit codes -> (K/8, N) int32, row 8r+i in bits 4i..4i+3 (the format, by hand)."""
    k, n = codes.shape
    out = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        out |= codes[i::8].long() << (4 * i)
    return out.to(torch.int32)  # wraps past 2^31 as the format's int32 does


def _write_layer(tensors: dict, name: str, qw, zero_offset: int) -> None:
    tensors[f"{name}.qweight"] = _pack_rows(qw.codes.T)  # (K/8, N)
    tensors[f"{name}.qzeros"] = _pack_rows(qw.zero.long() - zero_offset).T.contiguous()  # (G, N/8)
    tensors[f"{name}.scales"] = qw.scale.T.contiguous().half()
    tensors[f"{name}.g_idx"] = qw.g_idx.int()


def test_unpack_int32_spreads_eight_fields_lowest_bits_first():
    packed = torch.tensor([[0x76543210, -0x10000000 + 0x0FEDCBA9]], dtype=torch.int32)  # (1, 2)
    assert unpack_int32(packed, dim=1).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 15]]
    assert unpack_int32(packed, dim=0)[:, 0].tolist() == list(range(8))


@pytest.mark.parametrize("fmt,offset", [("gptq", 1), ("gptq_v2", 0)])
def test_a_checkpoint_in_the_gptq_format_reads_back_as_our_weights(tmp_path, fmt, offset):
    torch.manual_seed(0)
    names = {
        "self_attn.q_proj": (32, 64),
        "self_attn.k_proj": (16, 64),
        "self_attn.v_proj": (16, 64),
        "self_attn.o_proj": (64, 32),
        "mlp.gate_proj": (48, 64),
        "mlp.up_proj": (48, 64),
        "mlp.down_proj": (64, 48),
    }
    ours, tensors = {}, {}
    for name, shape in names.items():
        qw = rtn(torch.randn(shape), 4, 16)
        qw.zero.clamp_(min=1)  # the gptq format stores zero - 1 in 4 bits
        qw.scale = qw.scale.half().float()  # the format keeps fp16 scales
        ours[name] = qw
        _write_layer(tensors, f"model.layers.0.{name}", qw, offset)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"bits": 4, "group_size": 16, "checkpoint_format": fmt, "pack_dtype": "int32"}
    (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    weights, cfg = read_gptq_checkpoint(tmp_path)
    assert cfg["group_size"] == 16
    for name, qw in ours.items():
        got = weights[f"model.layers.0.{name}"]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.zero, qw.zero)
        assert torch.equal(got.scale, qw.scale) and torch.equal(got.g_idx, qw.g_idx)
    fused = as_decoder_weights(weights, 1)
    qkv = fused["blocks.0.attn.qkv"]
    assert qkv.codes.shape == (64, 64)
    assert torch.equal(qkv.codes[32:48], ours["self_attn.k_proj"].codes)
    assert torch.equal(fused["blocks.0.ffn.gate_up"].dequantize()[48:], ours["mlp.up_proj"].dequantize())
    config["bits"] = 3
    (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="4-bit"):
        read_gptq_checkpoint(tmp_path)


def _pack_awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """(R, N) 4-bit codes -> (R, N/8) int32: output row 8c+j of word c in the field AWQ's interleave
    [0, 2, 4, 6, 1, 3, 5, 7] gives it (row 8c+order[i] in bits 4i..4i+3), written out by hand."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    r, n = codes.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for i, j in enumerate(order):
        out |= codes[:, j::8].long() << (4 * i)
    return out.to(torch.int32)


def test_a_checkpoint_in_the_awq_gemm_format_reads_back_as_our_weights_and_norms(tmp_path):
    torch.manual_seed(0)
    names = {"self_attn.o_proj": (64, 32), "mlp.down_proj": (32, 48)}
    ours, tensors = {}, {}
    for name, shape in names.items():
        qw = rtn(torch.randn(shape), 4, 16)
        qw.scale = qw.scale.half().float()
        ours[name] = qw
        p = f"model.layers.0.{name}"
        tensors[p + ".qweight"] = _pack_awq_columns(qw.codes.T)  # (K, N/8)
        tensors[p + ".qzeros"] = _pack_awq_columns(qw.zero.T)  # (G, N/8)
        tensors[p + ".scales"] = qw.scale.T.contiguous().half()  # (G, N)
    norms = {"input_layernorm": torch.rand(32), "post_attention_layernorm": torch.rand(32)}
    tensors |= {f"model.layers.0.{n}.weight": t for n, t in norms.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"bits": 4, "group_size": 16, "checkpoint_format": "gemm", "zero_point": True}
    (tmp_path / "quantize_config.json").write_text(json.dumps(config))
    weights, others, _ = read_awq_checkpoint(tmp_path)
    for name, qw in ours.items():
        got = weights[f"model.layers.0.{name}"]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.zero, qw.zero)
        assert torch.equal(got.scale, qw.scale)
        assert torch.equal(got.g_idx, torch.arange(qw.codes.shape[1]) // 16)
    assert sorted(others) == sorted(f"model.layers.0.{n}.weight" for n in norms)
    decoder_norms = as_decoder_norms(others, 1)
    assert torch.equal(decoder_norms["blocks.0.norm2.weight"], norms["post_attention_layernorm"])
    for bad in ({"checkpoint_format": "gemv"}, {"zero_point": False}, {"bits": 3}):
        (tmp_path / "quantize_config.json").write_text(json.dumps(config | bad))
        with pytest.raises(ValueError, match="4-bit AWQ gemm"):
            read_awq_checkpoint(tmp_path)


def _quick_with_gptqmodel(script: str, tmp_path) -> dict:
    """A 7.4.1 script's quick figures, with GPTQModel run beside ours (skipped where it does not import)."""
    import importlib

    pytest.importorskip(
        "gptqmodel",
        reason="GPTQModel is an optional anchor (requirements-anchors.txt); without it only ours runs",
    )
    module = importlib.import_module(f"ch07_deployment.{script}")
    figures = module.main(["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "f.json")])
    assert figures["gptqmodel_status"] == "imports"
    return figures


def test_gptqmodel_quantises_the_trained_lm_to_our_codes(tmp_path):
    figures = _quick_with_gptqmodel("s7_4_1_gptq", tmp_path)
    assert figures["gptqmodel_block0_codes_equal"] == 1.0  # the inputs both runs share exactly
    assert figures["gptqmodel_codes_equal"] > 0.99
    assert abs(figures["gptqmodel_ppl"] - figures["gptq4_g32_ppl"]) < 0.01 * figures["gptq4_g32_ppl"]


def test_gptqmodels_awq_runs_beside_ours_and_reads_back(tmp_path):
    figures = _quick_with_gptqmodel("s7_4_1_awq", tmp_path)
    fp = figures["fp32_ppl"]
    # read back right, its AWQ loses less than round-to-nearest (quick: +0.20 against RTN's +0.49) and
    # shares most codes with ours (quick: 66%); a misread layout gives noise, a perplexity far above
    assert figures["gptqmodel_awq4_ppl"] - fp < figures["rtn4_ppl"] - fp
    assert figures["gptqmodel_awq4_codes_equal"] > 0.5
