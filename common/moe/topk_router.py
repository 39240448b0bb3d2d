"""Top-k softmax router, Mixtral's convention.

Softmax over *all* experts (in fp32), keep the k largest probabilities, renormalise them to sum to 1
(``normalize=False`` keeps the raw probabilities, as Qwen-MoE's ``norm_topk_prob=False`` does).
No capacity: no token is ever dropped.  Auxiliary losses (training only): the Switch/GShard balance
loss ``E · Σ_e f_e · P_e`` (``f`` over all k slots, see :mod:`common.moe.losses`) and the router z-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.moe.losses import balance_loss, z_loss
from common.moe.routing import Routing, check_topk


class TopKRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        balance_coef: float = 0.01,
        z_coef: float = 0.0,
    ):
        super().__init__()
        check_topk(k, num_experts)
        self.num_experts, self.k, self.normalize = num_experts, k, normalize
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, d_model), as Mixtral's gate
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, x: torch.Tensor, batch: int = 1) -> Routing:
        """x: (tokens, d_model); ``batch`` (sequences) is unused here."""
        logits = F.linear(x.float(), self.weight.float())  # (tokens, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (tokens, k)
        if self.normalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        aux, losses = logits.new_zeros(()), {}
        if self.training:
            losses = {"balance": balance_loss(probs, top_i), "z": z_loss(logits)}
            aux = self.balance_coef * losses["balance"] + self.z_coef * losses["z"]
        return Routing(top_i, top_p, None, logits, aux, {n: v.detach() for n, v in losses.items()})
