"""fastmoe's ``FMoELinear``: ``num_expert`` linear layers in one ``(num_expert, out, in)`` weight.

Rows arrive grouped by expert (``fwd_expert_count[e]`` rows for expert e, in order); each group
goes through its own weight and bias.  fastmoe runs this as one CUDA kernel; here it is one
``F.linear`` per non-empty expert (a single one when ``num_expert == 1``, as in
:class:`~common.fmoe.transformer.FMoETransformerMLP`'s experts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FMoELinear(nn.Module):
    def __init__(self, num_expert: int, in_feat: int, out_feat: int, bias: bool = True, rank: int = 0):
        super().__init__()
        self.num_expert, self.in_feat, self.out_feat, self.rank = num_expert, in_feat, out_feat, rank
        self.weight = nn.Parameter(torch.empty(num_expert, out_feat, in_feat))  # (E, out, in)
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_expert, out_feat))  # (E, out), left at zero
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear's weight

    def forward(self, inp: torch.Tensor, fwd_expert_count=None) -> torch.Tensor:
        """inp (rows, in_feat) grouped by expert; fwd_expert_count (num_expert,) rows per expert
        (not needed with one expert)."""
        if inp.shape[-1] != self.in_feat:
            raise ValueError(f"FMoELinear expects {self.in_feat} input features, got {inp.shape[-1]}")
        if self.num_expert == 1:
            return F.linear(inp, self.weight[0], None if self.bias is None else self.bias[0])
        counts = [int(c) for c in fwd_expert_count]
        outs = [
            F.linear(x, self.weight[e], None if self.bias is None else self.bias[e])
            for e, x in enumerate(inp.split(counts))
        ]
        return torch.cat(outs) if outs else inp.new_zeros(0, self.out_feat)

    def extra_repr(self) -> str:
        return (
            f"num_expert={self.num_expert}, in_features={self.in_feat}, out_features={self.out_feat}, "
            f"bias={self.bias is not None}, rank={self.rank}"
        )
