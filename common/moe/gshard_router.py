"""GShard's top-2 router (Lepikhin et al. 2020), with capacity and random routing.

1. softmax in fp32; first choice ``e1`` = argmax, second ``e2`` = argmax of the rest (p1, p2 their
   probabilities);
2. random routing (training only): the second expert is kept with probability ``min(1, 2·p2)``,
   ``p2`` the raw softmax probability (fairseq's ``second_expert_policy="random"``), so a token whose
   second choice is weak mostly goes to one expert.  Seedable with ``seed``; off in eval;
3. capacity ``ceil(capacity_factor · 2 · tokens / E)`` per expert (DeepSpeed's top2gating); all
   first choices are placed before any second choice, each in token order, and what does not fit
   is dropped;
4. weights ``g1/(g1+g2)``, ``g2/(g1+g2)`` computed *after* the masking (a token that lost its second
   expert puts weight 1 on its first), as DeepSpeed's ``top2gating``;
5. balance loss ``E · Σ_e f_e P_e`` with ``f`` from the first choices only, as DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.moe.losses import balance_loss, z_loss
from common.moe.routing import (
    Routing,
    check_capacity_factor,
    check_topk,
    expert_capacity,
    positions_in_expert,
)


class GShardRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        random_routing: bool = True,
        balance_coef: float = 0.01,
        z_coef: float = 0.0,
        seed: int | None = None,
    ):
        super().__init__()
        check_topk(2, num_experts)
        check_capacity_factor(capacity_factor)
        self.num_experts, self.capacity_factor, self.random_routing = (
            num_experts,
            capacity_factor,
            random_routing,
        )
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, d_model), as DeepSpeed's wg
        nn.init.normal_(self.weight, std=d_model**-0.5)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _uniform(self, like: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return torch.rand_like(like)
        if self._generator is None or self._generator.device != like.device:
            self._generator = torch.Generator(like.device).manual_seed(self.seed)
        return torch.rand(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor, batch: int = 1) -> Routing:
        """x: (tokens, d_model)."""
        tokens = x.shape[0]
        logits = F.linear(x.float(), self.weight.float())  # (tokens, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(2, dim=-1)  # (tokens, 2): first, second
        keep = torch.ones_like(top_i, dtype=torch.bool)
        if self.training and self.random_routing:
            keep[:, 1] = self._uniform(top_p[:, 1]) < 2 * top_p[:, 1]
        # positions: every first choice, in token order, then every kept second choice
        mask1 = F.one_hot(top_i[:, 0], self.num_experts)  # (tokens, E)
        mask2 = F.one_hot(top_i[:, 1], self.num_experts) * keep[:, 1:]
        pos1 = positions_in_expert(mask1)
        pos2 = positions_in_expert(mask2) + (mask1.sum(dim=0) * mask2).sum(dim=-1)
        capacity = expert_capacity(self.capacity_factor, tokens, self.num_experts, k=2)
        keep = keep & (torch.stack([pos1, pos2], dim=-1) < capacity)
        g = top_p * keep
        weights = g / g.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).eps)
        aux, losses = logits.new_zeros(()), {}
        if self.training:
            losses = {"balance": balance_loss(probs, top_i[:, :1]), "z": z_loss(logits)}
            aux = self.balance_coef * losses["balance"] + self.z_coef * losses["z"]
        return Routing(top_i, weights, keep, logits, aux, {n: v.detach() for n, v in losses.items()})
