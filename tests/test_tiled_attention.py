"""The blockwise online-softmax attention of section 7.2.2, in PyTorch and as a Triton kernel, against
torch's scaled_dot_product_attention."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ch07_deployment.s7_2_2_gpu_shared_memory_attention import (
    blockwise_attention,
    naive_attention,
    triton_attention,
)


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


# (q_len, k_len, head_dim, block_q, block_k, scale of q): lengths that are not multiples of the blocks,
# a single query, a head_dim below 16 and one that is not a power of two, and scores up to ~150, where
# a plain exp() overflows float32 (above 88).
TRITON_CASES = [
    (64, 64, 16, 16, 16, 1),
    (77, 77, 32, 16, 32, 1),
    (33, 100, 20, 16, 16, 1),
    (5, 93, 8, 16, 32, 1),
    (1, 17, 16, 16, 16, 1),
    (100, 100, 64, 32, 16, 1),
    (40, 40, 8, 16, 16, 30.0),
]

# Triton chooses at its first import whether kernels are compiled or interpreted, for the whole process:
# the interpreter runs in a fresh one, so that this test neither depends on nor changes how the rest of
# the test session imported Triton.
_CHILD = """
import json, sys
import torch
import torch.nn.functional as F
from ch07_deployment.s7_2_2_gpu_shared_memory_attention import load_triton, triton_attention

assert load_triton("cpu")[2], "the kernel did not run under Triton's interpreter"
diffs = {}
for tq, tk, d, bq, bk, scale in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, tq, d) * scale, torch.randn(2, 3, tk, d), torch.randn(2, 3, tk, d)
    for causal in (False, True):
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = triton_attention(q, k, v, causal, bq, bk)
        diffs[f"{tq},{tk},{d},{bq},{bk},{scale},{causal}"] = (out - ref).abs().max().item()
print(json.dumps(diffs))
"""


@pytest.fixture(scope="module")
def triton_diffs():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is a GPU-only extra (requirements-gpu.txt)")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(TRITON_CASES)],
        cwd=Path(__file__).resolve().parents[1],
        env=os.environ | {"TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_kernel_equals_sdpa(triton_diffs, case, causal):
    """The Triton kernel, run by Triton's interpreter on the CPU, against SDPA."""
    diff = triton_diffs[",".join(map(str, case)) + f",{causal}"]
    # fp32 scores of ~150 carry rounding of ~1e-5 in any fp32 attention: SDPA's own result differs from
    # float64 SDPA by up to 1.1e-5 there. A softmax without the running maximum gives inf/NaN.
    assert diff <= (1e-5 if case[-1] == 1 else 5e-5)


def test_triton_bad_blocks():
    """Checked before Triton is imported: this runs without it."""
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="powers of two"):
        triton_attention(q, q, q, block_q=24)
    with pytest.raises(ValueError, match="powers of two"):
        triton_attention(q, q, q, block_k=8)
    with pytest.raises(ValueError, match="float32"):
        triton_attention(q.double(), q.double(), q.double())
