"""fastmoe's gates (``fmoe.gates``) in plain PyTorch: which experts each token goes to, and with what score.

Every gate maps flat tokens ``(tokens, d_model)`` to ``(gate_top_k_idx, gate_score)``: the chosen
*global* expert ids ``(tokens, top_k)`` (an id is ``worker · num_expert + local expert``; ``-1`` marks
a slot a capacity limit or random routing dropped, which then outputs zero) and their scores
``(tokens, top_k)``.  A gate's auxiliary loss waits in ``gate.get_loss()`` (cleared when read).

* :class:`NaiveGate` -- ``nn.Linear(d_model, tot_expert)`` (``gate.gate``, with a bias unless
  ``gate_bias=False``), top-k of the logits, softmax over those k logits only (which equals the
  softmax over all experts renormalised over the k chosen).  No loss.
* :class:`NoisyGate` -- Shazeer et al.'s noisy top-k: ``w_gate``/``w_noise`` of shape (d_model,
  tot_expert), softplus noise in training, loss ``cv²(importance) + cv²(load)``.
* :class:`GShardGate` -- NaiveGate top-2 plus GShard's balance loss
  ``mean_e(c_e · m_e) · num_expert²`` (``c_e`` the share of *first* choices, ``m_e`` the mean softmax),
  a capacity of ``ceil(capacity · tokens)`` slots per expert (fastmoe's formula, without a division
  by the number of experts: it rarely drops anything) and random routing: the second slot is dropped
  where ``2 · score₂ < U(0, 1)``.
* :class:`SwitchGate` -- top-1 of a softmax over ``logits + U(1-ε, 1+ε)`` (fastmoe *adds* the noise,
  in training only), capacity ``ceil(capacity · tokens / num_expert)``, loss
  ``tot_expert · Σ_e f_e · P_e`` over the slots that survived the capacity.

``capacity=(train, eval)`` rates, as fastmoe.  Where fastmoe's CUDA kernel prunes over-capacity
slots in whatever order its threads run, we drop by position in (token, slot) order, the order the
kernel approximates; over several workers, capacity is counted on each worker's own tokens.
fastmoe asks ``topk`` for ``sorted=False`` and then reads column 0 as the first choice; we sort, so
column 0 always is the first choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.moe.losses import balance_loss
from common.moe.routing import check_topk, positions_in_expert


class BaseGate(nn.Module):
    def __init__(self, num_expert: int, world_size: int):
        super().__init__()
        if num_expert < 1 or world_size < 1:
            raise ValueError(f"num_expert and world_size must be >= 1, got {num_expert} and {world_size}")
        self.world_size, self.num_expert = world_size, num_expert
        self.tot_expert = world_size * num_expert
        self.loss = None

    def forward(self, x):
        raise NotImplementedError(
            "BaseGate is an interface; use NaiveGate, NoisyGate, GShardGate or SwitchGate"
        )

    def set_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss

    def get_loss(self, clear: bool = True) -> torch.Tensor | None:
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self) -> bool:
        return self.loss is not None


def limit_by_capacity(topk_idx: torch.Tensor, tot_expert: int, capacity: int) -> torch.Tensor:
    """Set to -1 every slot past the ``capacity``-th that chose its expert, in (token, slot) order.

    topk_idx: (tokens, k) expert ids, -1 already dropped; returns a new (tokens, k) tensor.
    """
    flat = topk_idx.reshape(-1)
    one_hot = F.one_hot(flat.clamp_min(0), tot_expert) * (flat >= 0).unsqueeze(-1)  # (tokens·k, E)
    over = positions_in_expert(one_hot) >= capacity
    return flat.masked_fill(over, -1).view_as(topk_idx)


class NaiveGate(BaseGate):
    def __init__(
        self, d_model: int, num_expert: int, world_size: int, top_k: int = 2, gate_bias: bool = True
    ):
        super().__init__(num_expert, world_size)
        check_topk(top_k, self.tot_expert)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)
        self.top_k = top_k

    def forward(self, inp: torch.Tensor, return_all_scores: bool = False):
        gate = self.gate(inp)  # (tokens, tot_expert) logits
        top_val, top_idx = torch.topk(gate, k=self.top_k, dim=-1)  # (tokens, k)
        gate_score = F.softmax(top_val.view(-1, self.top_k), dim=-1)  # (tokens, k)
        if return_all_scores:
            return top_idx, gate_score, gate
        return top_idx, gate_score


class NoisyGate(BaseGate):
    def __init__(self, d_model: int, num_expert: int, world_size: int, top_k: int = 2):
        super().__init__(num_expert, world_size)
        check_topk(top_k, self.tot_expert)
        self.w_gate = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.w_noise = nn.Parameter(torch.zeros(d_model, self.tot_expert))
        self.top_k = top_k
        self.softplus = nn.Softplus()
        self.softmax = nn.Softmax(1)
        self.noise_epsilon = 1e-2
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.w_gate, a=math.sqrt(5))  # as nn.Linear
        nn.init.kaiming_uniform_(self.w_noise, a=math.sqrt(5))

    def _prob_in_top_k(self, clean, noisy, noise_stddev, noisy_top):
        """P(expert stays in the top k under fresh noise), differentiable: (tokens, E)."""
        threshold_if_in = noisy_top[:, self.top_k : self.top_k + 1]  # (tokens, 1) the (k+1)-th value
        threshold_if_out = noisy_top[:, self.top_k - 1 : self.top_k]  # (tokens, 1) the k-th value
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_stddev)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_stddev)
        return torch.where(noisy > threshold_if_in, prob_if_in, prob_if_out)

    @staticmethod
    def cv_squared(x: torch.Tensor) -> torch.Tensor:
        """Squared coefficient of variation ``var / mean²`` (unbiased variance, as torch.var)."""
        if x.shape[0] == 1:
            return x.new_zeros(())
        return x.float().var() / (x.float().mean() ** 2 + 1e-10)

    def forward(self, inp: torch.Tensor):
        clean_logits = inp @ self.w_gate  # (tokens, E)
        noise_stddev = (self.softplus(inp @ self.w_noise) + self.noise_epsilon) * self.training
        logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        top_logits, top_indices = logits.topk(min(self.top_k + 1, self.tot_expert), dim=1)
        top_k_indices = top_indices[:, : self.top_k]  # (tokens, k)
        top_k_gates = self.softmax(top_logits[:, : self.top_k])  # (tokens, k)
        gates = torch.zeros_like(logits).scatter(1, top_k_indices, top_k_gates)  # (tokens, E)
        if self.top_k < self.tot_expert and self.training:
            load = self._prob_in_top_k(clean_logits, logits, noise_stddev, top_logits).sum(0)
        else:  # no noise: the load is the count of tokens per expert (not differentiable)
            load = (gates > 0).sum(0)
        self.set_loss(self.cv_squared(gates.sum(0)) + self.cv_squared(load))
        return top_k_indices.contiguous().view(-1), top_k_gates.contiguous().unsqueeze(1)


class GShardGate(NaiveGate):
    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int,
        topk: int = 2,
        capacity: tuple[float, float] = (1.2, 2.4),
        random_routing: bool = True,
        gate_bias: bool = True,
    ):
        if topk != 2:
            raise ValueError(f"GShardGate routes every token to 2 experts, got topk={topk}")
        super().__init__(d_model, num_expert, world_size, top_k=2, gate_bias=gate_bias)
        self.capacity, self.random_routing = capacity, random_routing

    def forward(self, x: torch.Tensor):
        topk_idx, topk_val, logits = super().forward(x, return_all_scores=True)
        # c_e: share of first choices; m_e: mean probability; fastmoe's mean over tot_expert · num_expert²
        loss = (
            balance_loss(F.softmax(logits, dim=1), topk_idx[:, :1]) * self.num_expert**2 / self.tot_expert**2
        )
        self.set_loss(loss)
        cap_rate = self.capacity[0 if self.training else 1]
        topk_idx = limit_by_capacity(topk_idx, self.tot_expert, math.ceil(cap_rate * x.shape[0]))
        if self.random_routing:
            drop_second = 2 * topk_val[:, 1] < torch.rand(x.shape[0], device=x.device)
            topk_idx[:, 1].masked_fill_(drop_second, -1)
        return topk_idx, topk_val


class SwitchGate(NaiveGate):
    def __init__(
        self,
        d_model: int,
        num_expert: int,
        world_size: int,
        topk: int = 1,
        switch_eps: float = 0.1,
        capacity: tuple[float, float] = (1.2, 2.4),
        gate_bias: bool = True,
    ):
        if topk != 1:
            raise ValueError(f"SwitchGate routes every token to 1 expert, got topk={topk}")
        super().__init__(d_model, num_expert, world_size, top_k=1, gate_bias=gate_bias)
        self.switch_eps, self.capacity = switch_eps, capacity

    def forward(self, inp: torch.Tensor):
        score = self.gate(inp)  # (tokens, E)
        if self.training:  # fastmoe adds U(1-eps, 1+eps) to the logits
            score = score + torch.rand_like(score) * 2 * self.switch_eps + 1.0 - self.switch_eps
        score = F.softmax(score.float(), dim=-1)
        top1_score, top1_idx = torch.topk(score, k=1, dim=-1)  # (tokens, 1)
        cap_rate = self.capacity[0 if self.training else 1]
        top1_idx = limit_by_capacity(
            top1_idx, self.tot_expert, math.ceil(cap_rate * inp.shape[0] / self.num_expert)
        )
        valid = top1_idx[top1_idx > -1]
        fraction_expert = torch.bincount(valid, minlength=self.tot_expert).float() / valid.numel()
        prob_expert = score.sum(dim=0) / valid.numel()
        self.set_loss((fraction_expert * prob_expert).sum() * self.tot_expert)
        return top1_idx, top1_score.to(inp.dtype)
