"""common.quant: RTN, GPTQ and AWQ against their defining properties; packing, QuantLinear, save/load."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from common.calibration import block_inputs, calibration_windows
from common.models.decoder import DecoderConfig, DecoderLM
from common.quant import (
    Hessian,
    QuantLinear,
    _scale_groups,
    apply_scales,
    awq_model,
    gptq,
    gptq_model,
    load_quantized,
    pack_codes,
    pack_model,
    quantize_gptq,
    quantize_rtn,
    rtn,
    rtn_model,
    save_quantized,
    unpack_codes,
)


def anisotropic_inputs(n=4096, cols=256, rank=32, seed=0):
    """Correlated inputs whose channels differ in scale, as a transformer's activations do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    x = x + 0.1 * torch.randn(n, cols, generator=g)
    return x * torch.logspace(-0.5, 0.5, cols)


def tiny_lm(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, context_length=32, n_layer=2, d_model=64, n_head=4, n_kv_head=4)
    model = DecoderLM(DecoderConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # trained-looking norms: not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_output_error_is_a_fraction_of_rtn(bits):
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    x = anisotropic_inputs()
    h = Hessian(256)
    h.add(x)
    ref = x @ w.T
    err_rtn = (x @ quantize_rtn(w, bits, 128).T - ref).pow(2).mean()
    err_gptq = (x @ quantize_gptq(w, h.H, bits, 128).T - ref).pow(2).mean()
    err_act = (x @ quantize_gptq(w, h.H, bits, 128, act_order=True).T - ref).pow(2).mean()
    assert err_gptq < 0.4 * err_rtn  # about a third
    assert err_act < err_gptq


def test_hessian_is_two_xtx_over_n_across_batches():
    x = torch.randn(300, 16)
    h = Hessian(16)
    for part in x.split(70):
        h.add(part)
    torch.testing.assert_close(h.H, 2 * x.T @ x / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (3, 32, True), (2, -1, False)])
def test_every_group_holds_at_most_2_to_the_bits_values(bits, group_size, act_order):
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    h = Hessian(128)
    h.add(anisotropic_inputs(1024, 128, 16))
    for qw in (rtn(w, bits, group_size), gptq(w, h.H, bits, group_size, act_order=act_order)):
        deq = qw.dequantize()
        assert qw.codes.max() < 2**bits and qw.zero.max() < 2**bits
        for g in qw.g_idx.unique():
            cols = qw.g_idx == g
            assert cols.sum() == (128 if group_size == -1 else group_size)
            for row in deq[:, cols]:
                assert row.unique().numel() <= 2**bits
        assert (deq - w).abs().mean() < w.abs().mean()  # a quantisation of w, not of something else


def test_rtn_error_is_at_most_half_a_step():
    w = torch.randn(8, 64)
    qw = rtn(w, 4, 16)
    step = qw.scale[:, qw.g_idx]
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_lazy_block_updates_equal_column_by_column_updates():
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    h = Hessian(256)
    h.add(anisotropic_inputs(2048, 256, 64))
    lazy = gptq(w, h.H, 4, 64, block_size=128, group_range="updated").dequantize()
    eager = gptq(w, h.H, 4, 64, block_size=1, group_range="updated").dequantize()
    torch.testing.assert_close(lazy, eager, rtol=0, atol=1e-4)
    # the reference's group range depends on the block size: with one-column blocks every update has
    # reached W when a group starts, so it is the updated range
    one_column = gptq(w, h.H, 4, 64, block_size=1).dequantize()
    torch.testing.assert_close(one_column, eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [64, 33])
def test_pack_unpack_is_exact(bits, cols):
    codes = torch.randint(0, 2**bits, (7, cols), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    if bits <= 4:
        assert packed.shape == (7, (cols + 1) // 2)
    assert torch.equal(unpack_codes(packed, cols, bits), codes)


@pytest.mark.parametrize("bias", [False, True])
def test_quantlinear_equals_float_linear_with_dequantised_weight(bias):
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 24, bias=bias)
    h = Hessian(64)
    h.add(anisotropic_inputs(512, 64, 8))
    qw = gptq(lin.weight, h.H, 4, 16, act_order=True)
    q = QuantLinear.from_quantized(qw, lin.bias)
    x = torch.randn(3, 5, 64)
    assert torch.equal(q(x), F.linear(x, qw.dequantize(), lin.bias))
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (24, 32)


def test_save_load_gives_the_same_logits(tmp_path):
    model = tiny_lm()
    idx = torch.randint(0, 97, (2, 20))
    windows = calibration_windows(torch.randint(0, 97, (8 * 32,)), 8, 32)
    fake, qweights = gptq_model(model, windows, bits=4, group_size=32, act_order=True)
    packed = pack_model(fake, qweights)
    torch.testing.assert_close(logits(packed, idx), logits(fake, idx), rtol=1e-5, atol=1e-5)
    save_quantized(packed, tmp_path / "q", {"method": "gptq", "bits": 4, "group_size": 32})
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.safetensors", "quant_config.json"]
    loaded, config = load_quantized(tmp_path / "q")
    assert config["quantization"]["method"] == "gptq" and len(config["layers"]) == 8
    assert torch.equal(logits(loaded, idx), logits(packed, idx))
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.blocks.modules())


def _edit_config(folder, edit):
    import json

    config = json.loads((folder / "quant_config.json").read_text())
    edit(config)
    (folder / "quant_config.json").write_text(json.dumps(config))


def _resign(folder):
    """Make the checksum agree again, as a careful tamperer would: the other checks must still hold."""
    from common.checkpoint import file_sha256

    _edit_config(folder, lambda c: c.update(weights_sha256=file_sha256(folder / "model.safetensors")))


def _set_layer(key, value):
    return lambda c: c["layers"]["blocks.0.attn.qkv"].update({key: value})


def _three_bits_everywhere(config):
    for spec in config["layers"].values():
        spec["bits"] = 3
    config["quantization"]["bits"] = 3


def _saved_rtn(tmp_path):
    fake, qweights = rtn_model(tiny_lm(), 4, 32)
    return save_quantized(
        pack_model(fake, qweights), tmp_path / "q", {"method": "rtn", "bits": 4, "group_size": 32}
    )


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_set_layer("bits", 3), "blocks.0.attn.qkv has bits 3, the quantization block 4"),
        (_three_bits_everywhere, "says 3 bits, its codes reach 15"),  # consistent, but the codes say 4
        (_set_layer("group_size", 16), "has group_size 16"),
        (lambda c: c["quantization"].update(group_size=64), "the quantization block 64"),
        (lambda c: c.pop("layers"), "'layers'"),
    ],
    ids=["layer-bits", "all-bits", "layer-group", "block-group", "no-layers"],
)
def test_a_tampered_quantised_config_is_refused_with_one_value_error(tmp_path, tamper, message):
    folder = _saved_rtn(tmp_path)
    _edit_config(folder, tamper)
    _resign(folder)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_quantized(folder)


@pytest.mark.parametrize(
    "text, message", [("{not json", "is not readable JSON"), ("[1]", "has format 'list'")]
)
def test_an_unreadable_quantised_config_is_one_value_error(tmp_path, text, message):
    folder = _saved_rtn(tmp_path)
    (folder / "quant_config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_quantized(folder)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_weights_file_fails_its_checksum(tmp_path, damage):
    folder = _saved_rtn(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x01  # one bit of one code: loads fine, computes wrong, unless checked
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum in quant_config.json"):
        load_quantized(folder)


def test_quantising_leaves_the_callers_model_alone():
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calibration_windows(torch.randint(0, 97, (4 * 32,)), 4, 32)
    rtn_model(model, 4, 32)
    gptq_model(model, windows, 4, 32)
    awq_model(model, windows, 4, 32, n_grid=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_awq_scaling_is_exact_before_quantisation():
    model = tiny_lm(n_kv_head=4)
    idx = torch.randint(0, 97, (2, 20))
    expected = logits(model, idx)
    torch.manual_seed(4)
    with torch.no_grad():
        for block in model.blocks:
            groups = _scale_groups(block)
            assert [g.prev for g in groups] == ["norm1", "v", "norm2", "up"]
            for group in groups:
                width = block.get_submodule(group.linears[0]).in_features
                apply_scales(block, group, torch.empty(width).uniform_(0.25, 4.0))
    assert not torch.allclose(model.blocks[0].norm1.weight, tiny_lm().blocks[0].norm1.weight)
    torch.testing.assert_close(logits(model, idx), expected, rtol=1e-4, atol=1e-5)


def test_awq_model_is_a_scaled_model_with_4_bit_weights():
    model = tiny_lm()
    windows = calibration_windows(torch.randint(0, 97, (8 * 32,)), 8, 32)
    fake, qweights, info = awq_model(model, windows, bits=4, group_size=32, n_grid=5)
    assert len(info["alphas"]) == 8 and all(0 <= a < 1 for a in info["alphas"])
    idx = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(
        logits(pack_model(fake, qweights), idx), logits(fake, idx), rtol=1e-5, atol=1e-5
    )
    for name, qw in qweights.items():
        assert torch.equal(fake.get_submodule(name).weight, qw.dequantize())


def test_block_inputs_are_the_first_blocks_inputs():
    model = tiny_lm()
    windows = torch.randint(0, 97, (5, 16))
    (x, args, kwargs), *rest = block_inputs(model, windows, batch_size=4)
    assert x.shape == (4, 16, 64) and len(rest) == 1
    torch.testing.assert_close(x, model.tok_emb(windows[:4]))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quantize_rtn(torch.randn(4, 64), bits=5), "unsupported bit width 5"),
        (lambda: quantize_rtn(torch.randn(4, 64), group_size=48), "group_size=48"),
        (
            lambda: quantize_gptq(torch.randn(4, 64), torch.eye(32), group_size=-1),
            r"hessian must be \(64, 64\)",
        ),
        (lambda: calibration_windows(torch.arange(100), 4, 32), "calibration data has 100 tokens"),
    ],
)
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_load_refuses_a_folder_that_is_not_a_quantised_model(tmp_path):
    with pytest.raises(ValueError, match="not a quantised model folder"):
        load_quantized(tmp_path)
    (tmp_path / "quant_config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        load_quantized(tmp_path)


# ------------------------------------------------------------------------- GPTQ against the reference loop


def _reference_fasterquant(W, H, bits, groupsize, actorder, percdamp=0.01, blocksize=128):
    """A transcription of the reference GPTQ (IST-DASLab gptq.py, ``GPTQ.fasterquant`` with its
    ``Quantizer(perchannel=True, sym=False)``), written out from reading it: the codes it rounds to."""
    maxq = 2**bits - 1

    def find_params(x):  # quant.py Quantizer.find_params, per channel, asymmetric
        xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        return scale.unsqueeze(1), torch.round(-xmin / scale).unsqueeze(1)

    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    codes = torch.zeros_like(W)
    diag = torch.arange(columns)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
            c = torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq)
            q = (scale * (c - zero)).flatten()
            codes[:, i1 + i] = c.flatten()
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return codes[:, invperm] if actorder else codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_gptq_codes_equal_the_reference_loop(group_size, act_order):
    torch.manual_seed(0)
    rows, cols = 48, 384  # three blocks of 128: groups of 32 and 64 start inside blocks
    X = torch.randn(2048, cols) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols) / cols**0.5)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(rows, cols)
    W[3, 5] = 9.0  # the dead input holds row 3's largest weight: the per-row range keeps it
    want = _reference_fasterquant(W, H, 4, group_size, act_order)
    got = gptq(W, H, bits=4, group_size=group_size, act_order=act_order)
    assert torch.equal(got.codes.float(), want)
    if group_size in (32, 64):  # the other group range is a different quantiser there
        other = gptq(W, H, bits=4, group_size=group_size, act_order=act_order, group_range="updated")
        assert not torch.equal(other.codes.float(), want)
    with pytest.raises(ValueError, match="group_range"):
        gptq(W, H, group_range="fresh")


@pytest.mark.parametrize("group_size", [32, 128])
def test_rtn_codes_equal_torchaos_asymmetric_int4(group_size):
    """torchao's IntxWeightOnlyConfig(int4, PerGroup, asymmetric) is an RTN nobody here wrote: its signed
    codes and zero points are ours minus 8, its scales ours."""
    pytest.importorskip("torchao", reason="torchao is optional (requirements-anchors.txt)")
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 48, bias=False))
    ours = rtn(layer[0].weight.detach(), 4, group_size)
    config = IntxWeightOnlyConfig(torch.int4, PerGroup(group_size), MappingType.ASYMMETRIC)
    quantize_(layer, config)
    theirs = layer[0].weight
    assert torch.equal(theirs.qdata.int() + 8, ours.codes.int())
    assert torch.equal(theirs.zero_point.int().view(48, -1) + 8, ours.zero.int())
    torch.testing.assert_close(theirs.scale.float().view(48, -1), ours.scale, rtol=0, atol=0)
