"""Section 7.2.2: attention in tiles with an online softmax, the idea behind FlashAttention.

Plain attention ``softmax(q k^T / sqrt(d)) v`` materialises the (queries, keys) score matrix: memory
that grows with the square of the sequence. FlashAttention (Dao et al., 2022) never does: it walks the
keys in blocks and keeps, for each query, a running maximum ``m``, a running sum of exponentials ``l``
and a running weighted sum of values ``acc``. When a new block raises the maximum, the old sums are
rescaled by ``exp(m_old - m_new)``, so after the last block ``acc / l`` is exactly the softmax-weighted
sum. On a GPU each (query block, key block) tile lives in the streaming multiprocessor's shared memory
(SRAM) and the scores never reach the GPU's main memory (HBM). The same arithmetic is written twice:
in PyTorch, block by block, readable, on any device (:func:`blockwise_attention`); and as a Triton
kernel, one program per block of queries, as a GPU runs it (:func:`build_triton_kernel`).

The script shows:

1. :func:`blockwise_attention` equals ``F.scaled_dot_product_attention`` (fp32, 1e-5), causal and not,
   at odd sequence lengths and block sizes that do not divide them;
2. the peak memory of naive attention against the blockwise one at growing sequence length, measured
   in a fresh process each;
3. the SDPA backends available here (math, flash, memory-efficient, cuDNN), timed side by side;
4. the Triton kernel equals SDPA too: compiled and timed beside SDPA on a GPU; on a machine without
   one, where Triton imports, its interpreter runs the same kernel on the CPU with numpy (checked on
   small shapes, never timed); where Triton is missing (a GPU-only extra, requirements-gpu.txt) that
   part is reported as skipped and the rest runs.

    python -m ch07_deployment.s7_2_2_gpu_shared_memory_attention
    python -m ch07_deployment.s7_2_2_gpu_shared_memory_attention --quick
"""

from __future__ import annotations

import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

from common.env import require
from common.machine import best_seconds, peak_memory
from common.runner import (
    SkipScript,
    checks_done,
    int_between,
    int_list,
    parse_args,
    quick_or_full,
    run_script,
    script_parser,
)


def _check_inputs(q, k, v, causal: bool, block_q: int, block_k: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q (b, h, tq, d) and k, v (b, h, tk, d) disagree: {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(
            f"causal attention needs at least as many keys as queries, got {k.shape[2]} < {q.shape[2]}"
        )


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
    _check_inputs(q, k, v, causal, block_q, block_k)
    q_len, k_len = q.shape[2], k.shape[2]
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


# ----------------------------------------------------------------------------- the same in Triton

TRITON_HINT = "a GPU-only extra: pip install triton (requirements-gpu.txt); CUDA builds of torch ship it"


def build_triton_kernel(triton):
    """The FlashAttention forward as a Triton kernel (``triton.jit`` of the function below).

    One program computes one block of ``BLOCK_Q`` queries of one (batch, head): it loads its query
    tile once, then walks the keys in blocks of ``BLOCK_K``, loading each K and V tile with ``tl.load``
    and keeping the running maximum ``m``, sum ``l`` and output ``acc`` of :func:`blockwise_attention`.
    On a GPU the compiler stages the K and V tiles that ``tl.dot`` multiplies in the streaming
    multiprocessor's shared memory (copied ahead of use while the previous tile is being multiplied);
    the (BLOCK_Q, BLOCK_K) score tile and ``m``, ``l``, ``acc`` stay in registers, and only the final
    output block is written back to the GPU's main memory.
    """
    import triton.language as tl

    @triton.jit
    def flash_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr,  # (batch·heads, len, head_dim) each, contiguous
        q_len, k_len, head_dim, scale,
        CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        q_block = tl.program_id(0)  # which block of queries
        head = tl.program_id(1)  # which of the batch·heads
        q_pos = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,) query positions
        dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head_dim rounded up to a power of two
        q_in, d_in = q_pos < q_len, dims < head_dim  # the last block and the padding fall outside
        q = tl.load(
            q_ptr + (head * q_len + q_pos[:, None]) * head_dim + dims[None, :],
            mask=q_in[:, None] & d_in[None, :],
            other=0.0,
        )  # (BLOCK_Q, BLOCK_D)
        q = q * scale
        m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)  # running max
        l = tl.zeros((BLOCK_Q,), dtype=tl.float32)  # running sum of exp(score - m)  # noqa: E741
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)  # running sum of exp(score - m) · v
        offset = k_len - q_len  # query i sits at key position i + offset
        k_stop = k_len
        if CAUSAL:  # keys past this block's last query are never visible: skip their tiles
            k_stop = tl.minimum(k_len, (q_block + 1) * BLOCK_Q + offset)
        for k_start in range(0, k_stop, BLOCK_K):  # key block 0 always has a visible key: m is finite
            k_pos = k_start + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_in = k_pos < k_len
            k_t = tl.load(
                k_ptr + (head * k_len + k_pos[None, :]) * head_dim + dims[:, None],
                mask=d_in[:, None] & k_in[None, :],
                other=0.0,
            )  # (BLOCK_D, BLOCK_K): K transposed, read straight from memory
            s = tl.dot(q, k_t, input_precision="ieee")  # (BLOCK_Q, BLOCK_K) fp32, not TF32
            visible = tl.broadcast_to(k_in[None, :], (BLOCK_Q, BLOCK_K))  # keys past k_len: padding
            if CAUSAL:
                visible = visible & (k_pos[None, :] <= q_pos[:, None] + offset)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])  # (BLOCK_Q, BLOCK_K)
            correction = tl.exp(m - m_new)  # rescales what was summed under the old maximum
            l = l * correction + tl.sum(p, axis=1)  # noqa: E741
            v = tl.load(
                v_ptr + (head * k_len + k_pos[:, None]) * head_dim + dims[None, :],
                mask=k_in[:, None] & d_in[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_D)
            acc = acc * correction[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        tl.store(
            out_ptr + (head * q_len + q_pos[:, None]) * head_dim + dims[None, :],
            acc / l[:, None],
            mask=q_in[:, None] & d_in[None, :],
        )

    return flash_attention_kernel


@functools.cache
def load_triton(device: str):
    """Import Triton and wrap the kernel: ``(triton, kernel, interpreted)``.

    Compiled for the GPU on ``cuda``. Elsewhere Triton's interpreter runs the same kernel on CPU
    tensors with numpy (``TRITON_INTERPRET=1``): a check of the arithmetic, slow, never a timing.
    Triton reads that variable at its first import (its own ``tl.zeros``, ``tl.max``... are
    ``@triton.jit`` functions wrapped then) and again at each launch, so on a CPU it is set before
    the import and stays set for the rest of the process. Raises :class:`SkipScript` where Triton
    does not import, or was already imported here without the interpreter.
    """
    if device != "cuda":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SkipScript(
                "triton was imported in this process without TRITON_INTERPRET=1, so its interpreter "
                "cannot run the kernel on the CPU",
                "run in a fresh process",
            )
        os.environ["TRITON_INTERPRET"] = "1"
    triton = require("triton", TRITON_HINT)
    return triton, build_triton_kernel(triton), bool(triton.knobs.runtime.interpret)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """:func:`blockwise_attention` by the Triton kernel, one program per (query block, batch·head).
    Same shapes and causal convention; fp32; blocks are powers of two from 16 (``tl.arange`` needs a
    power of two, ``tl.dot`` at least 16)."""
    _check_inputs(q, k, v, causal, block_q, block_k)
    for block in (block_q, block_k):
        if block < 16 or block & (block - 1):
            raise ValueError(f"Triton block sizes must be powers of two >= 16, got {block_q}, {block_k}")
    if q.dtype != torch.float32:
        raise ValueError(f"the kernel is written for float32, got {q.dtype}")
    triton, kernel, _ = load_triton(q.device.type)
    b, h, q_len, d = q.shape
    k_len = k.shape[2]
    q3, k3, v3 = (x.reshape(b * h, x.shape[2], d).contiguous() for x in (q, k, v))  # (b·h, len, d)
    out = torch.empty_like(q3)
    grid = (triton.cdiv(q_len, block_q), b * h)
    kernel[grid](
        q3, k3, v3, out, q_len, k_len, d, 1.0 / math.sqrt(d),
        CAUSAL=causal, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return out.reshape(b, h, q_len, d)


# ----------------------------------------------------------------------------- the script


def check_equal(name: str, attention, device: str, cases, d: int = 32) -> float:
    """``attention(q, k, v, causal, block_q, block_k)`` against SDPA at each (q_len, k_len, block_q,
    block_k) of ``cases``, causal and not; the largest difference (raises above 1e-5)."""
    torch.manual_seed(0)
    worst = 0.0
    print(f"{name} vs F.scaled_dot_product_attention (fp32, head_dim {d}):")
    for tq, tk, bq, bk in cases:
        q = torch.randn(2, 3, tq, d, device=device)
        k, v = torch.randn(2, 3, tk, d, device=device), torch.randn(2, 3, tk, d, device=device)
        for causal in (False, True):
            mask = None
            if causal:  # SDPA's is_causal aligns to the top-left; the KV-cache convention needs a mask
                mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            err = (attention(q, k, v, causal, bq, bk) - ref).abs().max().item()
            worst = max(worst, err)
            print(f"  q_len {tq:4d} k_len {tk:4d} blocks {bq:2d}x{bk:2d} causal={causal!s:5}", end="")
            print(f"  max |diff| {err:.2e}")
    if worst > 1e-5:
        raise AssertionError(f"{name} differs from SDPA by {worst:.2e} > 1e-5")
    return worst


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
                best = best_seconds(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, 3
                )
            print(f"  {backend.name:22} {best * 1e3:9.2f} ms")
            figures[f"sdpa_{backend.name.lower()}_ms"] = best * 1e3
        except RuntimeError:  # torch raises when the chosen backend has no kernel for these inputs
            print(f"  {backend.name:22} no kernel for {device} here")
    return figures


def triton_part(device: str, quick: bool) -> dict:
    """The Triton kernel against SDPA: compiled on a GPU (and timed there beside SDPA and the blockwise
    PyTorch version), run by Triton's interpreter on a CPU (checked, small shapes, not timed)."""
    try:
        _, _, interpreted = load_triton(device)
    except SkipScript as e:
        print(f"\nTriton kernel: skipped: {e}")
        return {"triton": f"skipped: {e}"}
    ran = (
        "interpreted on the CPU (TRITON_INTERPRET=1: numpy; checked, not timed)"
        if interpreted
        else f"compiled for {device}"
    )
    print(f"\nTriton kernel, {ran}:")
    cases = [(77, 77, 16, 32), (33, 100, 16, 16), (1, 50, 16, 16)]
    if not interpreted:
        cases += [(1000, 1000, 64, 64), (257, 1500, 32, 64)]
    elif quick:
        cases = cases[1:]
    figures = {
        "triton": ran,
        "triton_max_abs_diff_vs_sdpa": check_equal("triton", triton_attention, device, cases),
    }
    if not interpreted:
        seq = 2048
        q, k, v = (torch.randn(1, 8, seq, 64, device=device) for _ in range(3))
        timings = {
            "triton": lambda: triton_attention(q, k, v, True),
            "blockwise": lambda: blockwise_attention(q, k, v, True, 128, 128),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        print(f"  causal, 8 heads of 64, {seq} tokens, fp32, best of 3:")
        for name, fn in timings.items():
            figures[f"{name}_{seq}_ms"] = best_seconds(fn, device, 3) * 1e3
            print(f"  {name:10} {figures[f'{name}_{seq}_ms']:9.2f} ms")
    return figures


def main(argv=None) -> dict:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--lengths",
        type=int_list(1, 1 << 16),
        default=None,
        help="sequence lengths of the memory test (default 512,1024,2048,4096; quick 256,1024)",
    )
    parser.add_argument("--heads", type=int_between(1, 256), default=8, help="heads in the memory test")
    args = parse_args(parser, argv)
    quick_or_full(args, lengths=([256, 1024], [512, 1024, 2048, 4096]))
    lengths = args.lengths
    checks_done(args)

    blockwise_cases = ((77, 77, 16, 24), (128, 128, 64, 64), (33, 100, 7, 13), (1, 50, 64, 16))
    figures = {
        "max_abs_diff_vs_sdpa": check_equal("blockwise", blockwise_attention, args.device, blockwise_cases)
    }
    figures |= memory_vs_length(lengths, args.heads, 64)
    figures |= sdpa_backends(args.device, 512 if args.quick else 2048)
    figures |= triton_part(args.device, args.quick)
    return figures


if __name__ == "__main__":
    run_script(main)
