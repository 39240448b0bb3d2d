"""Positional information: sinusoidal encodings, learned embeddings and rotary embeddings (RoPE).

Attention by itself is blind to order, so a Transformer adds where each token sits:

- sinusoidal (Vaswani et al., 2017): a fixed table ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``,
  ``PE[pos, 2i+1] = cos(...)`` added to the token embeddings;
- learned: an ``nn.Embedding(context_length, d_model)`` added the same way (GPT-2);
- rotary (Su et al., 2021; Llama): queries and keys are rotated, pair of features by pair of features,
  by an angle proportional to their position, so that ``q_m . k_n`` depends only on ``m - n``.
  We use the Llama / Hugging Face layout: feature ``j`` of the first half pairs with feature
  ``j + head_dim/2`` (``rotate_half``), with ``inv_freq[j] = rope_theta ** (-2j / head_dim)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sine/cosine table of "Attention Is All You Need" to (batch, seq, d_model) inputs."""

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"sinusoidal encoding needs an even d_model, got {d_model}")
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
        div_term = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe, persistent=False)  # (max_len, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        if seq > self.pe.shape[0]:
            raise ValueError(
                f"sequence of length {seq} is longer than the positional table ({self.pe.shape[0]})"
            )
        return x + self.pe[:seq]


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE, looked up by position.

    ``forward(positions)`` takes (seq,) or (batch, seq) integer positions and returns ``cos, sin`` of
    shape (seq, head_dim) or (batch, 1, seq, head_dim), ready to broadcast
    against (batch, heads, seq, head_dim).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # (batch, seq, hd) -> (batch, 1, seq, hd)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) queries or keys by their positions' angles."""
    return x * cos + rotate_half(x) * sin
