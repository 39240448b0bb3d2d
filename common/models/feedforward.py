"""Position-wise feed-forward networks: GELU MLP, SwiGLU and ReLU².

- ``gelu``: ``W2 · gelu(W1 x)``, the GPT-2/BERT MLP (the original Transformer used ReLU), d_ff = 4·d_model;
- ``swiglu`` (Shazeer, 2020; Llama): ``W_down · (silu(W_gate x) ⊙ W_up x)``; with three matrices instead of
  two, d_ff defaults to 8/3·d_model (rounded up to a multiple of 64) to keep the parameter count;
- ``relu2`` (So et al., 2021 "Primer"; nanochat): ``W2 · relu(W1 x)²``, d_ff = 4·d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FFNS = ("gelu", "swiglu", "relu2")


def default_d_ff(kind: str, d_model: int) -> int:
    """The hidden width each kind conventionally uses."""
    if kind == "swiglu":
        return 64 * -(-(8 * d_model // 3) // 64)
    if kind in FFNS:
        return 4 * d_model
    raise ValueError(f"unknown feed-forward {kind!r}; choose one of {', '.join(FFNS)}")


class MLP(nn.Module):
    """Two-matrix MLP with GELU or squared-ReLU activation."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        if activation not in ("gelu", "relu2"):
            raise ValueError(f"MLP activation must be 'gelu' or 'relu2', got {activation!r}")
        self.activation = activation
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h).square()
        return self.dropout(self.proj(h))


class SwiGLU(nn.Module):
    """Gated MLP: ``down(silu(gate(x)) * up(x))``.

    The gate and up projections are one ``nn.Linear`` with 2·d_ff outputs (gate rows first, then up
    rows): one matrix multiply instead of two.
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # 2 x (batch, seq, d_ff)
        return self.dropout(self.down(F.silu(gate) * up))


def make_feedforward(
    kind: str, d_model: int, d_ff: int | None = None, bias: bool = False, dropout: float = 0.0
) -> nn.Module:
    """Build the feed-forward named ``kind`` (one of ``FFNS``); ``d_ff=None`` uses :func:`default_d_ff`."""
    d_ff = d_ff or default_d_ff(kind, d_model)
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, bias=bias, dropout=dropout)
    if kind in ("gelu", "relu2"):
        return MLP(d_model, d_ff, activation=kind, bias=bias, dropout=dropout)
    raise ValueError(f"unknown feed-forward {kind!r}; choose one of {', '.join(FFNS)}")
