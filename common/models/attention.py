"""Attention: the scaled dot-product core, encoder-decoder multi-head attention, and the decoder's
causal self-attention with grouped KV heads, QK-norm, RoPE and a KV cache.

The core (Vaswani et al., 2017)::

    attention(Q, K, V) = softmax(Q K^T / sqrt(d_head)) V

Masks follow the ``F.scaled_dot_product_attention`` convention: a boolean ``mask`` is True where a
query MAY attend to a key. :func:`scaled_dot_product_attention` is the readable version and is what
:class:`MultiHeadAttention` uses; :class:`CausalSelfAttention` (the decoder LM's hot path) calls
PyTorch's fused kernel, which computes the same thing (the tests check both against each other).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models.norms import RMSNorm
from common.models.positional import apply_rope


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) boolean mask, True on and below the diagonal aligned to the END of the keys.

    With a KV cache the q_len new queries are the last q_len positions of the k_len keys.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, written out.

    q: (..., q_len, d), k: (..., k_len, d), v: (..., k_len, d_v); ``mask`` boolean (True = may attend) or
    float (added to the scores), broadcastable to (..., q_len, k_len). ``is_causal`` adds the causal mask.
    Returns (..., q_len, d_v).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., q_len, k_len)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _check_heads(d_model: int, n_head: int, n_kv_head: int | None = None) -> None:
    if n_head <= 0 or d_model % n_head:
        raise ValueError(f"n_head={n_head} must be positive and divide d_model={d_model}")
    if n_kv_head is not None and (n_kv_head <= 0 or n_head % n_kv_head):
        raise ValueError(f"n_kv_head={n_kv_head} must be positive and divide n_head={n_head}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention as in "Attention Is All You Need": queries from one sequence, keys and
    values from another (cross-attention) or the same one (self-attention).

    ``forward(query, key, value, key_padding_mask=None, causal=False)`` with query (batch, q_len, d_model),
    key/value (batch, k_len, d_model); ``key_padding_mask`` (batch, k_len) is True at PADDING keys
    (the ``nn.MultiheadAttention`` convention), ``causal`` hides later keys from each query.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_heads(d_model, n_head)
        self.n_head, self.d_head = n_head, d_model // n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.d_head).transpose(1, 2)  # (batch, heads, seq, d_head)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        if query.dim() != 3 or key.shape != value.shape or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"expected query (batch, q_len, d) and key = value (batch, k_len, d); got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        q, k, v = (
            self._split(self.q_proj(query)),
            self._split(self.k_proj(key)),
            self._split(self.v_proj(value)),
        )
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != key.shape[:2]:
                raise ValueError(
                    f"key_padding_mask must be (batch, k_len) = {tuple(key.shape[:2])}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            mask = ~key_padding_mask[:, None, None, :]  # (batch, 1, 1, k_len)
        out = scaled_dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.d_head)  # (batch, q_len, d_model)
        return self.out_proj(out)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    ``k[layer]``, ``v[layer]``: (batch, n_kv_head, max_len, head_dim). ``pos`` counts the filled positions;
    the model advances it once per forward, after all layers have written their new keys and values.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device=None,
        dtype=torch.float32,
    ):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, n_kv, new, hd) keys/values at ``pos``; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """The decoder LM's self-attention: MHA (n_kv_head = n_head), GQA (a divisor) or MQA (1).

    One fused projection makes queries, keys and values: rows [q heads | k heads | v heads], each head
    ``head_dim`` rows. Optional QK-norm (an RMSNorm over each head's features, before RoPE, as in
    OLMo 2 / Qwen 3), RoPE given as precomputed ``cos, sin``, and an optional :class:`KVCache`.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int,
        layer_idx: int = 0,
        bias: bool = False,
        qk_norm: bool = False,
        qk_norm_weight: bool = True,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        _check_heads(d_model, n_head, n_kv_head)
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.layer_idx = layer_idx
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_head * self.head_dim, d_model, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps, weight=qk_norm_weight) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps, weight=qk_norm_weight) if qk_norm else None
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (batch, seq, d_model). ``attn_mask``: boolean, broadcastable to (batch, 1, seq, keys), True =
        may attend; None means plain causal attention over all keys (cached ones included)."""
        b, t, _ = x.shape
        h, kv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * kv, hd).transpose(1, 2)  # (batch, h+2kv, seq, hd)
        qk, v = qkv.split((h + kv, kv), dim=1)  # (batch, h+kv | kv, seq, hd)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotate alike: one pass over both
        q, k = qk.split((h, kv), dim=1)  # (batch, h | kv, seq, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (batch, kv, keys, hd)
        n_keys = k.shape[2]
        is_causal = False
        if attn_mask is None and t > 1:
            if n_keys == t:
                is_causal = True
            else:  # new queries after cached keys
                attn_mask = causal_mask(t, n_keys, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=kv != h,
        )  # (batch, h, seq, hd)
        y = y.transpose(1, 2).reshape(b, t, h * hd)  # (batch, seq, d_model)
        return self.resid_dropout(self.proj(y))
