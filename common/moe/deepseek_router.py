"""DeepSeekMoE's router: V2 (softmax) and V3 (sigmoid, auxiliary-loss-free balancing).

Scoring (fp32):

* ``"softmax"`` (DeepSeek-V2): ``s = softmax(logits)``; a group's score is its best expert's score;
* ``"sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``; experts are *chosen* on ``s + b`` (the
  load-balancing bias ``b``) but *weighted* by the unbiased ``s``; a group's score is the sum of its
  top-2 biased scores.

Group-limited routing: the E experts form ``n_group`` groups; each token keeps its ``topk_group``
best groups and picks its k experts only inside them.  The other groups are masked with ``-inf``
(as transformers v5 and DeepSeek's own inference code do; DeepSeek's first Hugging Face code masked
with 0, which can pick a masked expert when biased scores go negative).

Weights: the chosen ``s``, normalised to sum to 1 when ``norm_topk_prob``, times
``routed_scaling_factor``.

Auxiliary-loss-free balancing (V3): after each training forward the bias moves outside autograd,
``b_i -= γ`` for an overloaded expert (more than the mean load), ``b_i += γ`` for an underloaded one.
Optional losses (training only): the sequence-wise balance loss (V3, coefficient ``seq_balance_coef``)
and the expert-level balance loss ``E · Σ f_e P_e`` (V2, ``balance_coef``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.moe.losses import balance_loss, sequence_balance_loss
from common.moe.routing import Routing, check_topk

SCORINGS = ("softmax", "sigmoid")


class DeepSeekRouter(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        scoring: str = "sigmoid",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_speed: float = 0.0,
        seq_balance_coef: float = 0.0,
        balance_coef: float = 0.0,
    ):
        super().__init__()
        check_topk(k, num_experts)
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
        if n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide the number of experts ({num_experts})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group must be between 1 and n_group ({n_group}), got {topk_group}")
        if k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"k={k} experts do not fit in topk_group={topk_group} groups of "
                f"{num_experts // n_group} experts"
            )
        if scoring == "sigmoid" and n_group > 1 and num_experts // n_group < 2:
            raise ValueError("sigmoid scoring scores a group by its top-2 experts: groups need >= 2 experts")
        self.num_experts, self.k, self.scoring = num_experts, k, scoring
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.bias_update_speed = bias_update_speed
        self.seq_balance_coef, self.balance_coef = seq_balance_coef, balance_coef
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # (E, d_model)
        nn.init.normal_(self.weight, std=d_model**-0.5)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))  # b, V3's name

    def _choice_mask(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask (-inf) the experts outside each token's ``topk_group`` best groups."""
        if self.n_group == 1:
            return choice
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # (tokens, groups, E/g)
        if self.scoring == "sigmoid":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (tokens, groups)
        else:
            group_scores = grouped.max(dim=-1).values
        best = group_scores.topk(self.topk_group, dim=-1).indices  # (tokens, topk_group)
        keep_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep_group.unsqueeze(-1), float("-inf")).view(-1, self.num_experts)

    def forward(self, x: torch.Tensor, batch: int = 1) -> Routing:
        """x: (batch·seq, d_model) flat tokens of ``batch`` sequences."""
        logits = F.linear(x.float(), self.weight.float())  # (tokens, E)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # b is 0 unless updated
        top_i = self._choice_mask(choice).topk(self.k, dim=-1).indices  # (tokens, k)
        weights = scores.gather(1, top_i)  # unbiased scores
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        aux, losses = logits.new_zeros(()), {}
        if self.training:
            losses = {
                "seq_balance": sequence_balance_loss(scores, top_i, batch),
                "balance": balance_loss(scores / scores.sum(-1, keepdim=True), top_i),
            }
            aux = self.seq_balance_coef * losses["seq_balance"] + self.balance_coef * losses["balance"]
            if self.bias_update_speed > 0:
                self.update_bias(top_i)
        return Routing(top_i, weights, None, logits, aux, {n: v.detach() for n, v in losses.items()})

    @torch.no_grad()
    def update_bias(self, expert_idx: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: ``b -= γ·sign(load - mean load)``, outside autograd."""
        load = torch.bincount(expert_idx.reshape(-1), minlength=self.num_experts).float()
        self.e_score_correction_bias -= self.bias_update_speed * torch.sign(load - load.mean())
