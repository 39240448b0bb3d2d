"""DecodeLayout: column-major copies held apart give the model's own outputs and tokens, and leave the
model's parameters exactly as they were."""

import pytest
import torch

from common.models.decode_layout import DecodeLayout, column_major
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate
from common.moe import TopKMoE


def _model(moe: bool, tied: bool) -> DecoderLM:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=97, context_length=48, n_layer=2, d_model=32, n_head=4, n_kv_head=2, tie_embeddings=tied
    )
    factory = (lambda i, c: TopKMoE(c.d_model, 24, num_experts=4, k=2)) if moe else None
    return DecoderLM(cfg, ffn_factory=factory).eval()


def test_column_major_keeps_shape_and_values():
    w = torch.randn(3, 5, 7)
    c = column_major(w)
    assert c.shape == w.shape and torch.equal(c, w) and c.transpose(-1, -2).is_contiguous()


@pytest.mark.parametrize("moe, tied", [(False, False), (False, True), (True, False)])
def test_same_logits_and_tokens_model_untouched(moe, tied):
    model = _model(moe, tied)
    before = {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()}
    fast = DecodeLayout(model)
    copied = [n for n, p in model.named_parameters() if p.dim() >= 2 and "tok_emb" not in n]
    assert set(fast.weights) >= set(copied)
    assert fast.extra_bytes == sum(w.nbytes for w in fast.weights.values()) > 0
    if moe:
        assert any(w.dim() == 3 for w in fast.weights.values())  # the stacked expert weights
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert generate(fast, prompts, 16) == generate(model, prompts, 16)
    for n, p in model.named_parameters():
        ptr, stride, value = before[n]
        assert p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, value), n
