"""The blockwise online-softmax attention of section 7.2.2 against torch's scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F

from ch07_deployment.s7_2_2_gpu_shared_memory_attention import blockwise_attention, naive_attention


def reference(q, k, v, causal):
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None  # last query sees all keys
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "tq,tk,bq,bk",
    [(64, 64, 16, 16), (77, 77, 16, 24), (31, 31, 64, 64), (5, 93, 3, 10), (1, 17, 4, 5), (100, 100, 1, 7)],
)
def test_blockwise_equals_sdpa(tq, tk, bq, bk, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 3, tq, 16)
    k, v = torch.randn(2, 3, tk, 16), torch.randn(2, 3, tk, 16)
    ref = reference(q, k, v, causal)
    torch.testing.assert_close(blockwise_attention(q, k, v, causal, bq, bk), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, causal), ref, atol=1e-5, rtol=1e-5)


def test_large_scores_do_not_overflow():
    """The running maximum keeps exp() finite where a plain exp of the scores would overflow."""
    q = torch.randn(1, 1, 40, 8) * 30
    k, v = torch.randn(1, 1, 40, 8) * 30, torch.randn(1, 1, 40, 8)
    out = blockwise_attention(q, k, v, True, 8, 8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, k, v, True), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="disagree"):
        blockwise_attention(q, torch.randn(1, 2, 8, 5), torch.randn(1, 2, 8, 5))
    with pytest.raises(ValueError, match="at least as many keys"):
        blockwise_attention(q, q[:, :, :4], q[:, :, :4], causal=True)
    with pytest.raises(ValueError, match="positive"):
        blockwise_attention(q, q, q, block_q=0)
