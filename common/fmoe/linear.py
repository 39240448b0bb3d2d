"""fastmoe's ``FMoELinear``: ``num_expert`` linear layers in one ``(num_expert, out, in)`` weight.

Rows arrive grouped by expert (``fwd_expert_count[e]`` rows for expert e, in order); each group
goes through its own weight and bias.  fastmoe runs this as one CUDA kernel, ``MOELinear``
(forward and backward); here :class:`MOELinear` is an autograd function with the same arguments
that runs one matrix product per non-empty expert, and writes the backward out: the input's
gradient ``g · W_e``, the weight's ``gᵀ · x`` and the bias's ``Σ g`` over each expert's rows.
As fastmoe, the input is cast to the weight's dtype first.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function


def _counts(fwd_expert_count, rows: int, num_expert: int) -> list[int]:
    counts = [int(c) for c in fwd_expert_count]
    if len(counts) != num_expert or sum(counts) != rows:
        raise ValueError(f"fwd_expert_count {counts} must give {num_expert} experts' rows summing to {rows}")
    return counts


class MOELinear(Function):
    """rows (N, in) grouped by expert, counts (E,), weight (E, out, in), bias (E, out) -> (N, out)."""

    @staticmethod
    def forward(ctx, global_input_buf, fwd_expert_count, weight, bias=None):
        counts = _counts(fwd_expert_count, global_input_buf.shape[0], weight.shape[0])
        out = global_input_buf.new_empty(global_input_buf.shape[0], weight.shape[1])
        for e, (x, y) in enumerate(zip(global_input_buf.split(counts), out.split(counts))):
            if x.shape[0] and bias is not None:
                torch.addmm(bias[e], x, weight[e].T, out=y)
            elif x.shape[0]:
                torch.matmul(x, weight[e].T, out=y)
        ctx.counts = counts
        ctx.save_for_backward(global_input_buf, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inp, weight, bias = ctx.saved_tensors
        grad_in, grad_w = torch.zeros_like(inp), torch.zeros_like(weight)
        grad_b = None if bias is None else torch.zeros_like(bias)
        chunks = zip(grad_out.split(ctx.counts), inp.split(ctx.counts), grad_in.split(ctx.counts))
        for e, (g, x, gx) in enumerate(chunks):
            if g.shape[0]:
                torch.matmul(g, weight[e], out=gx)  # (n, in)
                torch.matmul(g.T, x, out=grad_w[e])  # (out, in)
                if grad_b is not None:
                    torch.sum(g, 0, out=grad_b[e])
        return grad_in, None, grad_w, grad_b


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
        (optional with one expert)."""
        if inp.shape[-1] != self.in_feat:
            raise ValueError(f"FMoELinear expects {self.in_feat} input features, got {inp.shape[-1]}")
        if fwd_expert_count is None:
            if self.num_expert != 1:
                raise ValueError(f"FMoELinear with {self.num_expert} experts needs fwd_expert_count")
            fwd_expert_count = [inp.shape[0]]
        return MOELinear.apply(inp.type_as(self.weight), fwd_expert_count, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"num_expert={self.num_expert}, in_features={self.in_feat}, out_features={self.out_feat}, "
            f"bias={self.bias is not None}, rank={self.rank}"
        )
