"""Switch Transformer's top-1 router (Fedus et al. 2021), with capacity.

* fp32 router ("selective precision"); multiplicative jitter ``x · U(1-ε, 1+ε)`` on the *router's*
  input, in training only (the experts see the clean input);
* each token goes to its argmax expert with weight = that expert's probability (not renormalised);
* capacity ``ceil(capacity_factor · tokens / E)`` slots per expert; tokens are dropped **by
  position**: once an expert is full, every later token that chose it is dropped;
* what a dropped token outputs is the layer's choice (``MoELayer(dropped=...)``): zero (the
  residual connection carries it, as transformers v5 and DeepSpeed do) or pass-through of its input
  (transformers v4 returned the input scaled by the router probability);
* balance loss ``E · Σ f_e P_e`` on the argmax choices before any drop, and the router z-loss.

``per_sequence=True`` counts capacity per sequence instead of over the whole batch, and
``expert_capacity`` fixes the slots per expert: both as transformers' SwitchTransformersTop1Router.
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


class SwitchRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        jitter: float = 0.01,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        bias: bool = False,
        per_sequence: bool = False,
        expert_capacity: int | None = None,
    ):
        super().__init__()
        check_topk(1, num_experts)
        check_capacity_factor(capacity_factor)
        if expert_capacity is not None and expert_capacity < 1:
            raise ValueError(f"expert_capacity must be >= 1, got {expert_capacity}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.num_experts, self.capacity_factor, self.jitter = num_experts, capacity_factor, jitter
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.per_sequence, self.expert_capacity = per_sequence, expert_capacity
        self.classifier = nn.Linear(d_model, num_experts, bias=bias)

    def capacity(self, tokens_per_group: int) -> int:
        if self.expert_capacity is not None:
            return self.expert_capacity
        return expert_capacity(self.capacity_factor, tokens_per_group, self.num_experts)

    def forward(self, x: torch.Tensor, batch: int = 1) -> Routing:
        """x: (batch·seq, d_model) flat tokens of ``batch`` sequences."""
        h = x.float()
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = None if self.classifier.bias is None else self.classifier.bias.float()
        logits = F.linear(h, self.classifier.weight.float(), bias)  # (tokens, E)
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.max(dim=-1)  # (tokens,)
        groups = batch if self.per_sequence else 1
        one_hot = F.one_hot(top_i, self.num_experts).view(groups, -1, self.num_experts)  # (groups, T, E)
        keep = positions_in_expert(one_hot).view(-1) < self.capacity(one_hot.shape[1])  # (tokens,)
        aux, losses = logits.new_zeros(()), {}
        if self.training:
            losses = {"balance": balance_loss(probs, top_i[:, None]), "z": z_loss(logits)}
            aux = self.balance_coef * losses["balance"] + self.z_coef * losses["z"]
        return Routing(
            top_i[:, None],
            (top_p * keep)[:, None],
            keep[:, None],
            logits,
            aux,
            {n: v.detach() for n, v in losses.items()},
        )
