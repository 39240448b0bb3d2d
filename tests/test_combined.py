"""s7_4_4: the combined compressions store what they claim and compute what the fp32 model does, within
quantisation's error, on the project's test LM."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model

from ch07_deployment import s7_4_4_combined as combined
from common.calibration import block_linears, calibration_windows
from common.lm_source import load_pretrained
from common.models.decoder import DecoderLM
from common.prune import pruned_like
from common.quant import check_model_spec, load_quantized


@pytest.fixture(scope="module")
def source():
    return load_pretrained("test")


@pytest.fixture(scope="module")
def windows(source):
    return calibration_windows(source.data.train, 8, source.model.config.context_length)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def int4_bytes_from_counts(model, group):
    """Bytes a packed int4 model must hold: two codes a byte, an fp32 scale and a uint8 zero per (row,
    group), an int64 group index per column of every block linear; every other parameter in fp32."""
    quantised, total = set(), 0
    for block in model.blocks:
        for _, lin in block_linears(block):
            rows, cols = lin.weight.shape
            total += rows * ((cols + 1) // 2) + rows * (cols // group) * (4 + 1) + cols * 8
            quantised.add(id(lin.weight))
    return total + 4 * sum(p.numel() for p in model.parameters() if id(p) not in quantised)


def test_int4_file_is_smaller_by_the_factor_the_parameter_counts_give(source, windows, tmp_path):
    model = source.model
    fp = combined.float_variant(model, str(tmp_path / "fp32"))
    q = combined.four_bit(model, "gptq", 32, windows, str(tmp_path / "gptq4"))
    assert abs(fp.bytes - 4 * n_params(model)) < 8192  # the safetensors header is all that is added
    want = int4_bytes_from_counts(model, 32)
    assert want <= q.bytes < want + 8192, (q.bytes, want)  # header and JSON config on top
    assert q.bytes / fp.bytes == pytest.approx(want / (4 * n_params(model)), abs=0.02)
    x = source.data.val[:32][None]
    with torch.no_grad():
        assert (q.model(x)[0] - model(x)[0]).abs().max() > 0  # the packed layers really run


def test_pruned_model_has_half_the_ffn_neurons_and_stores_only_them(source, windows, tmp_path):
    model = source.model
    pruned = combined.prune_ffn(model, windows, 0.5)
    d_model, d_ff = model.config.d_model, model.blocks[0].ffn.d_ff
    removed = len(model.blocks) * (d_ff // 2) * 3 * d_model  # gate, up rows and down columns per neuron
    assert pruned.shape_summary()["d_ff"] == [d_ff // 2] * len(model.blocks)
    assert n_params(pruned) == n_params(model) - removed
    v = combined.float_variant(pruned, str(tmp_path / "pruned"))
    assert 4 * n_params(pruned) <= v.bytes < 4 * n_params(pruned) + 8192
    # the file names its shapes: a skeleton cut to them takes its tensors and gives the same logits
    path = str(tmp_path / "pruned" / "model.safetensors")
    with safe_open(path, "pt") as f:
        shapes = json.loads(f.metadata()["layer_shapes"])
    skeleton = pruned_like(DecoderLM(model.config), shapes)
    load_model(skeleton, path)
    x = source.data.val[:32][None]
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(x)[0], pruned(x)[0])
    # groups of 64 do not divide the 96 neurons left: the pruned model takes the largest that does
    group = combined.fitting_group(pruned, 64)
    assert group == math.gcd(64, d_model, d_ff // 2) and (d_ff // 2) % 64
    check_model_spec(pruned, 4, group)
    # pruned + 4-bit: the folder holds the pruned shapes and loads back to the same logits
    q = combined.four_bit(pruned, "gptq", group, windows, str(tmp_path / "pruned4"))
    loaded, _ = load_quantized(tmp_path / "pruned4")
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], q.plain(x)[0])  # the plain QuantLinear path, as saved
        assert (q.model(x)[0] - q.plain(x)[0]).abs().max() < 0.1  # its int4-kernel copy, bf16 rounding


def test_int8_paths_give_logits_close_to_fp32(source, tmp_path):
    model = source.model
    x = source.data.val[:64][None]
    with torch.no_grad():
        ref = model(x)[0]
        t8 = combined.torch_int8(model, str(tmp_path / "t8"))
        o8, info = combined.ort_int8(model, str(tmp_path / "o8"))
        for v in (t8, o8):
            out = v.model(x)[0]
            diff = (out - ref).abs()
            assert 0 < diff.max() < 0.05 * ref.abs().max(), diff.max()
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        assert o8.bytes < 0.6 * info["fp32_onnx_bytes"] and t8.bytes < 0.6 * 4 * n_params(model)
        # the torch int8 file loads back without running code and gives the same logits
        fresh = combined.torch_int8(model, str(tmp_path / "t8b")).model
        fresh.load_state_dict(torch.load(tmp_path / "t8" / "model.pt", weights_only=True))
        torch.testing.assert_close(fresh(x)[0], t8.model(x)[0], rtol=0, atol=0)


def test_main_reports_every_variant(tmp_path):
    figures = combined.main(
        [
            "--quick",
            "--distil-steps",
            "2",
            "--rounds",
            "1",
            "--eval-batches",
            "1",
            "--calib-samples",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    for key in combined.VARIANTS:
        for name in ("bytes", "size_ratio", "ms", "latency_ratio", "ppl", "bpb"):
            assert math.isfinite(figures[f"{key}_{name}"]) and figures[f"{key}_{name}"] > 0, (key, name)
    assert figures["fp32_latency_ratio"] == 1.0 and figures["fp32_size_ratio"] == 1.0
    for key in ("gptq4", "awq4", "distilled_gptq4", "pruned50_gptq4", "torch_int8", "ort_int8"):
        assert figures[f"{key}_bytes"] < figures["fp32_bytes"], key
    assert figures["distilled_params"] < figures["fp32_params"]
    assert figures["distilled_gptq4_bytes"] < figures["distilled_bytes"]
    assert figures["pruned50_gptq4_bytes"] < figures["pruned50_bytes"]
    assert (tmp_path / "combined.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags", [["--prune", "1.0"], ["--rounds", "0"], ["--alpha", "2"], ["--seq-len", "999"]]
)
def test_bad_flags_are_one_line_errors(flags, tmp_path):
    with pytest.raises(SystemExit) as e:
        combined.main(["--quick", *flags, "--out", str(tmp_path)])
    assert e.value.code == 2


def test_model_files_write_under_a_temporary_name_then_rename(tmp_path, monkeypatch):
    """A write that fails half way leaves neither a finished-looking file nor its temporary."""
    import safetensors.torch

    from common import model_files

    def broken(model, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        model_files.save_safetensors(torch.nn.Linear(2, 2), tmp_path / "m")
    assert list((tmp_path / "m").iterdir()) == []
    n = model_files.save_state_dict({"w": torch.ones(3)}, tmp_path / "s")
    assert n == (tmp_path / "s" / "model.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "s" / "model.pt", weights_only=True)["w"], torch.ones(3))
