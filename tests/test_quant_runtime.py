"""common.quant_runtime: torch's int4/int8 weight-only kernels against the plain QuantLinear path, the
activation dtype chosen both ways, the kernels' refusals, and whole-model decoding."""

import pytest
import torch
import torch.nn.functional as F

from common import quant_runtime
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate
from common.quant import Hessian, QuantLinear, gptq, pack_model, rtn, rtn_model
from common.quant_runtime import Int4Linear, Int8Linear, activation_dtype, runtime_layer, to_runtime


def _layer(out_features, in_features, bits, group_size, bias=True, act_order=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    if act_order:  # GPTQ's act-order: groups that are not contiguous columns
        h = Hessian(in_features)
        h.add(
            torch.randn(512, in_features)
            * torch.linspace(0.1, 3.0, in_features).flip(0)[torch.randperm(in_features)]
        )
        qw = gptq(lin.weight, h.H, bits, group_size, act_order=True)
    else:
        qw = rtn(lin.weight, bits, group_size)
    return QuantLinear.from_quantized(qw, lin.bias)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_the_plain_path(group_size, act_order):
    plain = _layer(48, 256, 4, group_size, act_order=act_order)
    if act_order:
        assert not torch.equal(plain.g_idx, torch.arange(256) // group_size)
    x = torch.randn(2, 5, 256)
    want = plain(x)
    fp32 = Int4Linear(plain, torch.float32)
    torch.testing.assert_close(fp32(x), want, rtol=1e-5, atol=3e-5)
    bf16 = Int4Linear(plain, torch.bfloat16)
    got = bf16(x)
    assert got.dtype == x.dtype
    ref = F.linear(x.bfloat16().float(), plain.dequantized_weight(), plain.bias)  # bf16 inputs, exact weights
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_int8_kernel_equals_the_plain_path():
    plain = _layer(40, 96, 8, -1)
    x = torch.randn(3, 96)
    want = plain(x)
    torch.testing.assert_close(Int8Linear(plain, torch.float32)(x), want, rtol=1e-5, atol=1e-4)
    got = Int8Linear(plain, torch.bfloat16)(x)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


@pytest.mark.parametrize(
    "shape,bits,group,why",
    [
        ((24, 128), 4, 128, "not a multiple of 16"),
        ((32, 128), 4, 16, "group size 16"),
        ((32, 128), 3, 32, "3-bit codes"),
        ((32, 128), 8, 32, "groups of 32"),
    ],
)
def test_a_layer_the_kernels_refuse_stays_plain_and_says_why(shape, bits, group, why):
    plain = _layer(*shape, bits, group)
    layer, path = runtime_layer(plain, torch.bfloat16)
    assert layer is plain and path.startswith("plain QuantLinear") and why in path
    with pytest.raises(ValueError, match=why):
        (Int4Linear if bits == 4 else Int8Linear)(plain, torch.float32)


def test_activation_dtype_follows_the_device_both_ways(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert activation_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert activation_dtype("cpu") == torch.float32
    assert activation_dtype("meta") == torch.float32
    plain = _layer(32, 64, 4, 32)
    model = torch.nn.Sequential(plain)
    fast, paths = to_runtime(model)  # a CPU without bf16: the kernel with fp32 activations
    assert fast[0].act_dtype == torch.float32 and paths == {"0": "int4 kernel, float32 activations"}


def _tiny_lm():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, context_length=64, d_model=64, n_layer=2, n_head=4, d_ff=128)
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("bits,group", [(4, 32), (8, -1)])
def test_to_runtime_decodes_as_the_plain_model_and_leaves_it_untouched(bits, group):
    model = _tiny_lm()
    fake, qweights = rtn_model(model, bits, group)
    plain = pack_model(fake, qweights)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fast, paths = to_runtime(plain, torch.float32)
    assert all(isinstance(m, QuantLinear) for n, m in plain.named_modules() if n in paths)  # untouched
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    kernel = Int4Linear if bits == 4 else Int8Linear
    assert len(paths) == len(qweights) and all(isinstance(fast.get_submodule(n), kernel) for n in paths)
    prompt = [[1, 2, 3, 4, 5]]
    with torch.no_grad():
        x = torch.tensor(prompt)
        torch.testing.assert_close(fast(x)[0], plain(x)[0], rtol=1e-4, atol=1e-4)
    assert generate(fast, prompt, 12) == generate(plain, prompt, 12)
    bf16, _ = to_runtime(plain, torch.bfloat16)
    with torch.no_grad():
        diff = (bf16(x)[0] - plain(x)[0]).abs().max()
    assert diff < 0.1  # logits within bf16's rounding of the activations


def test_summarize_paths_counts_each_path():
    paths = {
        "a": "int4 kernel, bfloat16 activations",
        "b": "int4 kernel, bfloat16 activations",
        "c": "plain: x",
    }
    assert (
        quant_runtime.summarize_paths(paths)
        == "2 layers: int4 kernel, bfloat16 activations; 1 layer: plain: x"
    )


@pytest.mark.gpu
def test_int4_kernel_on_cuda_equals_the_plain_path():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the CUDA int4 kernel's packing is checked only on one")
    plain = _layer(64, 256, 4, 128).cuda()
    x = torch.randn(3, 256, device="cuda")
    got = Int4Linear(plain, torch.bfloat16)(x)
    ref = F.linear(x.bfloat16().float(), plain.dequantized_weight(), plain.bias)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
