"""fastmoe's ``FMoETransformerMLP`` (``fmoe.transformer``): an MoE feed-forward for a Transformer block.

Each expert is ``_Expert``: ``htoh4`` (d_model -> d_hidden), the activation (fastmoe's default
``torch.nn.GELU()``, the exact erf form), ``h4toh`` (d_hidden -> d_model), both
:class:`~common.fmoe.linear.FMoELinear` with a bias.  ``FMoETransformerMLP`` builds one
``_Expert(1, ...)`` per local expert in a ModuleList, so a state dict reads
``experts.{i}.htoh4.weight`` (1, d_hidden, d_model), ``experts.{i}.htoh4.bias`` (1, d_hidden),
``experts.{i}.h4toh.weight`` (1, d_model, d_hidden), ``experts.{i}.h4toh.bias`` (1, d_model) and
``gate.gate.weight`` (num_expert·world_size, d_model), ``gate.gate.bias``; ``_Expert(num_expert,
...)`` set as ``FMoE.experts`` runs all of a worker's experts as one fused module.
No residual and no norm inside: the block around it adds them.  ``expert_dp_comm`` tags the
experts' parameters for :class:`~common.fmoe.distributed.DistributedGroupedDataParallel`.
"""

from __future__ import annotations

import torch
from torch import nn

from common.fmoe.layers import FMoE
from common.fmoe.linear import FMoELinear


class _Expert(nn.Module):
    def __init__(self, num_expert: int, d_model: int, d_hidden: int, activation, rank: int = 0):
        super().__init__()
        self.htoh4 = FMoELinear(num_expert, d_model, d_hidden, bias=True, rank=rank)
        self.h4toh = FMoELinear(num_expert, d_hidden, d_model, bias=True, rank=rank)
        self.activation = activation

    def forward(self, inp: torch.Tensor, fwd_expert_count=None) -> torch.Tensor:
        """inp (rows, d_model) grouped by expert; the count is needed with several experts."""
        return self.h4toh(self.activation(self.htoh4(inp, fwd_expert_count)), fwd_expert_count)


class FMoETransformerMLP(FMoE):
    def __init__(
        self,
        num_expert: int = 32,
        d_model: int = 1024,
        d_hidden: int = 4096,
        activation=torch.nn.GELU(),  # noqa: B008 - fastmoe's default, a stateless module
        expert_dp_comm: str = "none",
        expert_rank: int = 0,
        **kwargs,
    ):
        super().__init__(
            num_expert=num_expert,
            d_model=d_model,
            expert=lambda d: _Expert(1, d, d_hidden, activation, rank=0),
            **kwargs,
        )
        self.d_hidden = d_hidden
        self.mark_parallel_comm(expert_dp_comm)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """inp (..., d_model) -> (..., d_model)."""
        if inp.shape[-1] != self.d_model:
            raise ValueError(
                f"FMoETransformerMLP expects d_model={self.d_model} features, got {inp.shape[-1]}"
            )
        original_shape = inp.shape
        return super().forward(inp.reshape(-1, self.d_model)).reshape(original_shape)
