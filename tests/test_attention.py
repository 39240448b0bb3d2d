"""Attention, norms, positions and feed-forwards against references nobody here wrote:
F.scaled_dot_product_attention, torch.nn.MultiheadAttention, torch.nn.LayerNorm / RMSNorm, and the
Llama modules of transformers (RMSNorm, RoPE, MLP), with weights copied across. fp32, 1e-5."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.models.attention import (
    CausalSelfAttention,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    scaled_dot_product_attention,
)
from common.models.feedforward import MLP, SwiGLU, default_d_ff, make_feedforward
from common.models.norms import LayerNorm, RMSNorm, make_norm
from common.models.positional import RotaryEmbedding, SinusoidalPositionalEncoding, apply_rope

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- the attention core


@pytest.mark.parametrize("q_len,k_len", [(7, 7), (3, 9)])
def test_core_matches_sdpa_without_mask(q_len, k_len):
    q, k, v = torch.randn(2, 3, q_len, 8), torch.randn(2, 3, k_len, 8), torch.randn(2, 3, k_len, 5)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=0
    )


def test_core_matches_sdpa_causal():
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    ours = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(
        ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0
    )


def test_core_matches_sdpa_with_boolean_and_float_masks():
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    bool_mask = torch.rand(2, 1, 6, 9) > 0.4
    bool_mask[..., 0] = True  # every query sees at least one key
    float_mask = torch.randn(2, 3, 6, 9)
    for mask in (bool_mask, float_mask):
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, mask=mask),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            atol=ATOL,
            rtol=0,
        )


def test_causal_mask_is_aligned_to_the_end_of_the_keys():
    # 2 new queries after 3 cached keys: query 0 is position 3, query 1 is position 4
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


# ----------------------------------------------------------------------------- multi-head attention


def _copy_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        wq, wk, wv = ref.in_proj_weight.chunk(3)
        bq, bk, bv = ref.in_proj_bias.chunk(3)
        for lin, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def test_mha_self_attention_matches_torch_with_padding_and_causal_masks():
    d, h = 32, 4
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    ours = MultiHeadAttention(d, h)
    _copy_mha(ours, ref)
    x = torch.randn(3, 7, d)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 3:] = True
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # torch's convention: True = may NOT attend
    expected, _ = ref(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
    got = ours(x, x, x, key_padding_mask=pad, causal=True)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_mha_cross_attention_matches_torch_and_gradients_agree():
    d, h = 24, 3
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    ours = MultiHeadAttention(d, h)
    _copy_mha(ours, ref)
    q, mem = torch.randn(2, 5, d), torch.randn(2, 8, d)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 6:] = True
    expected, _ = ref(q, mem, mem, key_padding_mask=pad, need_weights=False)
    got = ours(q, mem, mem, key_padding_mask=pad)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ours.k_proj.weight.grad, ref.in_proj_weight.grad.chunk(3)[1], atol=1e-4, rtol=1e-4
    )


def test_mha_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divide d_model"):
        MultiHeadAttention(30, 4)
    mha = MultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(
            torch.randn(2, 3, 16),
            torch.randn(2, 4, 16),
            torch.randn(2, 4, 16),
            key_padding_mask=torch.zeros(2, 3, dtype=torch.bool),
        )


# ----------------------------------------------------------------------------- causal self-attention


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_causal_self_attention_matches_the_readable_core(n_kv_head):
    d, h = 32, 4
    attn = CausalSelfAttention(d, h, n_kv_head).eval()
    x = torch.randn(2, 9, d)
    hd = d // h
    q, k, v = (
        attn.qkv(x).view(2, 9, h + 2 * n_kv_head, hd).transpose(1, 2).split((h, n_kv_head, n_kv_head), 1)
    )
    rep = h // n_kv_head
    k, v = (
        k.repeat_interleave(rep, dim=1),
        v.repeat_interleave(rep, dim=1),
    )  # each group of q heads shares a kv head
    y = scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, d)
    torch.testing.assert_close(attn(x), attn.proj(y), atol=ATOL, rtol=0)


def test_kv_cache_step_by_step_equals_full_pass():
    attn = CausalSelfAttention(32, 4, 2).eval()
    rope = RotaryEmbedding(8, 64)
    x = torch.randn(2, 10, 32)
    full = attn(x, rope(torch.arange(10)))
    cache = KVCache(1, 2, 2, 16, 8)
    parts = []
    for start, end in ((0, 4), (4, 5), (5, 8), (8, 10)):  # a prefill, single steps, a chunk
        parts.append(attn(x[:, start:end], rope(torch.arange(start, end)), kv_cache=cache))
        cache.pos = end
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="KV cache holds"):
        attn(torch.randn(2, 7, 32), rope(torch.arange(10, 17)), kv_cache=cache)


def test_causal_self_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="divide d_model"):
        CausalSelfAttention(30, 4, 4)
    with pytest.raises(ValueError, match="divide n_head"):
        CausalSelfAttention(32, 4, 3)


# ----------------------------------------------------------------------------- norms


def test_layernorm_matches_torch_with_and_without_bias():
    x = torch.randn(4, 5, 16) * 3 + 1
    for bias in (True, False):
        ref = nn.LayerNorm(16, eps=1e-5, bias=bias)
        nn.init.normal_(ref.weight)
        ours = LayerNorm(16, eps=1e-5, bias=bias)
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)


def test_rmsnorm_matches_llama_and_torch():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 5, 16) * 3
    ref = LlamaRMSNorm(16, eps=1e-5)
    nn.init.normal_(ref.weight)
    ours = RMSNorm(16, eps=1e-5)
    ours.weight.data.copy_(ref.weight.data)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)
    # training: outputs and gradients of input and weight
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(4, 5, 16)
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(y_ours, y_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=ATOL, rtol=1e-5)
    noweight = make_norm("rmsnorm_noweight", 16, 1e-5)
    assert noweight.weight is None and not list(noweight.parameters())
    torch.testing.assert_close(
        noweight(x), nn.RMSNorm(16, eps=1e-5, elementwise_affine=False)(x), atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batchnorm", 16)


# ----------------------------------------------------------------------------- positions


def test_sinusoidal_table_follows_the_paper_formula():
    d = 16
    pe = SinusoidalPositionalEncoding(d, max_len=50).pe
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)
    with pytest.raises(ValueError, match="longer than"):
        SinusoidalPositionalEncoding(d, max_len=4)(torch.zeros(1, 5, d))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_llama(theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hd, n = 16, 12
    cfg = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    q, k = torch.randn(2, 4, n, hd), torch.randn(2, 4, n, hd)
    position_ids = torch.stack([torch.arange(n), torch.arange(5, 5 + n)])  # (batch, seq), per-row offsets
    cos_ref, sin_ref = LlamaRotaryEmbedding(cfg)(q, position_ids)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    cos, sin = RotaryEmbedding(hd, 64, theta)(position_ids)
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, atol=ATOL, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 64)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        cq, sq = rope(torch.tensor([m]))
        ck, sk = rope(torch.tensor([n]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert math.isclose(score(3, 1), score(20, 18), abs_tol=1e-4)
    assert not math.isclose(score(3, 1), score(3, 2), abs_tol=1e-3)


# ----------------------------------------------------------------------------- feed-forwards


def test_swiglu_matches_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    ref = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48))
    ours = SwiGLU(32, 48)
    with torch.no_grad():
        ours.gate_up.weight.copy_(torch.cat([ref.gate_proj.weight, ref.up_proj.weight]))
        ours.down.weight.copy_(ref.down_proj.weight)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind,act", [("gelu", nn.GELU()), ("relu2", None)])
def test_mlp_matches_torch_layers(kind, act):
    ours = make_feedforward(kind, 16, bias=True)
    assert isinstance(ours, MLP) and ours.fc.out_features == 64
    fc, proj = nn.Linear(16, 64), nn.Linear(64, 16)
    fc.load_state_dict(ours.fc.state_dict())
    proj.load_state_dict(ours.proj.state_dict())
    x = torch.randn(2, 3, 16)
    h = fc(x)
    expected = proj(act(h) if act is not None else torch.relu(h) ** 2)
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=0)


def test_default_ffn_widths_and_errors():
    assert default_d_ff("swiglu", 384) == 1024 and default_d_ff("gelu", 384) == 1536
    assert default_d_ff("swiglu", 100) % 64 == 0
    with pytest.raises(ValueError, match="unknown feed-forward"):
        make_feedforward("tanh", 16)
