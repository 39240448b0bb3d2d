"""Section 7.2.2: attention in tiles with an online softmax, the idea behind FlashAttention.

Plain attention ``softmax(q k^T / sqrt(d)) v`` materialises the (queries, keys) score matrix: memory
that grows with the square of the sequence. FlashAttention (Dao et al., 2022) never does: it walks the
keys in blocks and keeps, for each query, a running maximum ``m``, a running sum of exponentials ``l``
and a running weighted sum of values ``acc``. When a new block raises the maximum, the old sums are
rescaled by ``exp(m_old - m_new)``, so after the last block ``acc / l`` is exactly the softmax-weighted
sum. On a GPU each (query block, key block) tile lives in the streaming multiprocessor's shared memory
(SRAM) and the scores never reach the GPU's main memory (HBM); here the same arithmetic is written in
PyTorch, block by block, readable (:func:`blockwise_attention`), and runs on any device.

The script shows:

1. :func:`blockwise_attention` equals ``F.scaled_dot_product_attention`` (fp32, 1e-5), causal and not,
   at odd sequence lengths and block sizes that do not divide them;
2. the peak memory of naive attention against the blockwise one at growing sequence length, measured
   in a fresh process each;
3. the SDPA backends available here (math, flash, memory-efficient, cuDNN), timed side by side;
4. a Triton kernel in the GPU's shared memory runs only where a GPU and Triton are present; otherwise
   that part is reported as skipped and the rest runs.

    python -m ch07_deployment.s7_2_2_gpu_shared_memory_attention
    python -m ch07_deployment.s7_2_2_gpu_shared_memory_attention --quick
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from common.machine import peak_memory
from common.runner import parse_args, run_script, script_parser


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Attention computed tile by tile with an online softmax; never holds more than one
    (block_q, block_k) tile of scores per head.

    q: (batch, heads, q_len, d); k, v: (batch, heads, k_len, d). ``causal``: query i sees keys up to
    ``i + k_len - q_len`` (the last query sees every key, as with a KV cache), so k_len >= q_len.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q (b, h, tq, d) and k, v (b, h, tk, d) disagree: {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
    q_len, k_len = q.shape[2], k.shape[2]
    if causal and k_len < q_len:
        raise ValueError(f"causal attention needs at least as many keys as queries, got {k_len} < {q_len}")
    offset = k_len - q_len  # query i sits at key position i + offset
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for qs in range(0, q_len, block_q):
        qe = min(qs + block_q, q_len)
        q_blk = q[:, :, qs:qe] * scale  # (b, h, bq, d)
        m = torch.full((*q_blk.shape[:3], 1), float("-inf"), dtype=q.dtype, device=q.device)  # running max
        l = torch.zeros_like(m)  # running sum of exp(score - m)  # noqa: E741
        acc = torch.zeros_like(q_blk)  # running sum of exp(score - m) · v
        last_key = qe - 1 + offset if causal else k_len - 1
        for ks in range(0, last_key + 1, block_k):  # key block 0 always has a visible key: m is finite
            ke = min(ks + block_k, k_len)
            s = q_blk @ k[:, :, ks:ke].transpose(-2, -1)  # (b, h, bq, bk) scores: the tile
            if causal and ke - 1 > qs + offset:  # the tile crosses the diagonal
                q_pos = torch.arange(qs, qe, device=q.device)[:, None] + offset
                k_pos = torch.arange(ks, ke, device=q.device)[None, :]
                s = s.masked_fill(k_pos > q_pos, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - m_new)  # (b, h, bq, bk)
            correction = torch.exp(m - m_new)  # rescales what was summed under the old maximum
            l = l * correction + p.sum(dim=-1, keepdim=True)  # noqa: E741
            acc = acc * correction + p @ v[:, :, ks:ke]
            m = m_new
        out[:, :, qs:qe] = acc / l
    return out


def naive_attention(q, k, v, causal: bool = False) -> torch.Tensor:
    """The textbook formula, with the whole (q_len, k_len) score matrix in memory."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (b, h, tq, tk)
    if causal:
        q_len, k_len = q.shape[2], k.shape[2]
        s = s.masked_fill(
            torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len).logical_not(),
            float("-inf"),
        )
    return torch.softmax(s, dim=-1) @ v


def check_equal(device: str) -> dict:
    torch.manual_seed(0)
    worst = 0.0
    print("blockwise vs F.scaled_dot_product_attention (fp32):")
    for tq, tk, bq, bk in ((77, 77, 16, 24), (128, 128, 64, 64), (33, 100, 7, 13), (1, 50, 64, 16)):
        q = torch.randn(2, 3, tq, 32, device=device)
        k, v = torch.randn(2, 3, tk, 32, device=device), torch.randn(2, 3, tk, 32, device=device)
        for causal in (False, True):
            mask = None
            if causal:  # SDPA's is_causal aligns to the top-left; the KV-cache convention needs a mask
                mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            err = (blockwise_attention(q, k, v, causal, bq, bk) - ref).abs().max().item()
            worst = max(worst, err)
            print(f"  q_len {tq:3d} k_len {tk:3d} blocks {bq:2d}x{bk:2d} causal={causal!s:5}", end="")
            print(f"  max |diff| {err:.2e}")
    if worst > 1e-5:
        raise AssertionError(f"blockwise attention differs from SDPA by {worst:.2e} > 1e-5")
    return {"max_abs_diff_vs_sdpa": worst}


def _qkv(seq: int, heads: int, d: int):
    torch.manual_seed(0)
    return tuple(torch.randn(1, heads, seq, d) for _ in range(3))


def _run_naive(qkv):
    return naive_attention(*qkv, causal=True).sum().item()


def _run_blockwise(qkv):
    return blockwise_attention(*qkv, causal=True, block_q=128, block_k=128).sum().item()


def _warmup():
    """Both versions once at a small size, so library buffers exist before the measurement."""
    _run_naive(_qkv(64, 2, 64))
    _run_blockwise(_qkv(64, 2, 64))


def memory_vs_length(lengths: list[int], heads: int, d: int) -> dict:
    print(f"\nPeak memory above q, k, v (causal, {heads} heads of {d}; fresh process each):")
    print(f"  {'seq':>6}{'scores MiB':>12}{'naive MiB':>12}{'blockwise MiB':>15}")
    figures = {}
    for t in lengths:
        naive = peak_memory(_qkv, _run_naive, t, heads, d, warmup=_warmup)
        tiled = peak_memory(_qkv, _run_blockwise, t, heads, d, warmup=_warmup)
        a, b = ((r["peak_bytes"] - r["setup_bytes"]) / 2**20 for r in (naive, tiled))
        print(f"  {t:6d}{heads * t * t * 4 / 2**20:12.1f}{a:12.1f}{b:15.1f}")
        figures |= {f"naive_peak_mib_{t}": a, f"blockwise_peak_mib_{t}": b}
    return figures


def sdpa_backends(device: str, seq: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 8, seq, 64, device=device) for _ in range(3))
    print(f"\nSDPA backends on {device} (causal, 8 heads of 64, {seq} tokens), best of 3:")
    figures = {}
    for backend in (
        SDPBackend.MATH,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                best = float("inf")
                for _ in range(3):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
            print(f"  {backend.name:22} {best * 1e3:9.2f} ms")
            figures[f"sdpa_{backend.name.lower()}_ms"] = best * 1e3
        except RuntimeError:  # torch raises when the chosen backend has no kernel for these inputs
            print(f"  {backend.name:22} no kernel for {device} here")
    return figures


def triton_part(device: str) -> str:
    if device != "cuda":
        return "skipped: no CUDA GPU here (Triton kernels run on NVIDIA and AMD GPUs)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "skipped: triton is not importable (pip install triton; it ships with CUDA builds of torch)"
    return "skipped: this script carries no Triton kernel; the blockwise PyTorch version above ran on the GPU"


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="sequence lengths of the memory test")
    parser.add_argument("--heads", type=int, default=8, help="heads in the memory test")
    args = parse_args(parser, argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if min(lengths) <= 0 or args.heads <= 0:
        parser.error("--lengths and --heads must be positive")
    if args.quick:
        lengths = [256, 1024]

    figures = check_equal(args.device)
    figures |= memory_vs_length(lengths, args.heads, 64)
    figures |= sdpa_backends(args.device, 512 if args.quick else 2048)
    status = triton_part(args.device)
    print(f"\nTriton shared-memory kernel: {status}")
    figures["triton"] = status
    return figures


if __name__ == "__main__":
    run_script(main)
