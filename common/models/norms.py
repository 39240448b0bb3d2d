"""Normalisation layers: LayerNorm and RMSNorm, each with or without a learned weight.

LayerNorm (Ba et al., 2016) centres and scales every token's feature vector:
    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
RMSNorm (Zhang & Sennrich, 2019), used by Llama and most modern LLMs, skips the centring and the bias:
    y = x / sqrt(mean(x**2) + eps) * weight
Both normalise over the last dimension. The arithmetic runs in PyTorch's fused kernels
(``F.layer_norm`` / ``F.rms_norm``), which compute exactly these formulas with fewer passes over memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("layernorm", "rmsnorm", "rmsnorm_noweight")


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension; ``bias=False`` drops the additive term (as in OLMo)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight``.

    ``weight=False`` gives the parameter-free variant (nanochat, some QK-norms): a pure rescaling.
    The eps sits inside the square root, as in Llama.
    """

    def __init__(self, dim: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float = 1e-5, bias: bool = False) -> nn.Module:
    """Build the norm named ``kind`` (one of ``NORMS``); ``bias`` only applies to LayerNorm."""
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, weight=True)
    if kind == "rmsnorm_noweight":
        return RMSNorm(dim, eps, weight=False)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
