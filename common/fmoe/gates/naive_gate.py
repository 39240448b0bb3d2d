"""fastmoe's ``NaiveGate``: one ``nn.Linear(d_model, tot_expert)`` (``gate.gate``), the top-k of its
logits and a softmax over those k (which equals the softmax over all experts renormalised over the
k chosen).

As fastmoe, ``torch.topk(..., sorted=False)``: the k chosen come in whatever order torch's kernel
leaves them, so column 0 is not always the largest logit (GShardGate's loss counts column 0 as the
"first choice", exactly as fastmoe does).  The loss is a zero tensor that requires a gradient, so
``sum(gate.get_loss() for every layer)`` works whatever the gates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.fmoe.gates.base_gate import BaseGate
from common.moe.routing import check_topk


class NaiveGate(BaseGate):
    def __init__(
        self, d_model: int, num_expert: int, world_size: int, top_k: int = 2, gate_bias: bool = True
    ):
        super().__init__(num_expert, world_size)
        check_topk(top_k, self.tot_expert)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)
        self.top_k = top_k

    def forward(self, inp: torch.Tensor, return_all_scores: bool = False):
        """inp (tokens, d_model) -> idx (tokens, k), score (tokens, k) [, logits (tokens, tot_expert)]."""
        gate = self.gate(inp)  # (tokens, tot_expert)
        gate_top_k_val, gate_top_k_idx = torch.topk(gate, k=self.top_k, dim=-1, largest=True, sorted=False)
        gate_score = F.softmax(gate_top_k_val.view(-1, self.top_k), dim=-1)  # (tokens, k)
        self.set_loss(torch.zeros(1, requires_grad=True).to(inp.device))
        if return_all_scores:
            return gate_top_k_idx, gate_score, gate
        return gate_top_k_idx, gate_score
