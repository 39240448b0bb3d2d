"""fastmoe's ``SwitchGate`` (Switch Transformer, Fedus et al. 2021).

In training the logits get uniform noise ``U(1-ε, 1+ε)`` *added* (fastmoe's choice; the paper
multiplies the input), computed as fastmoe does, ``noise = u · 2ε + 1 - ε`` then ``score += noise``,
so a test that replays the generator gets the same bits.  Then a float32 softmax and its top 1;
``ceil(cap · S / num_expert)`` slots per local expert, counted over the rows every worker sends it
(:func:`~common.fmoe.gates.utils.limit_by_capacity`: two workers that both send 8 slots to an
expert of capacity 4 keep 4 in all, not 4 each); loss ``tot_expert · Σ_e f_e · P_e`` over the slots
that survived.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.fmoe.gates.naive_gate import NaiveGate
from common.fmoe.gates.utils import limit_by_capacity


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
        if self.training:
            noise = torch.rand_like(score)
            noise = noise * 2 * self.switch_eps + 1.0 - self.switch_eps
            score += noise
        score = F.softmax(score.float(), dim=-1)  # fp32 softmax, as fastmoe
        top1_score, top1_idx = torch.topk(score, k=1, dim=-1, largest=True)  # (tokens, 1)
        top1_score = top1_score.to(dtype=inp.dtype)
        cap_rate = self.capacity[0 if self.training else 1]
        capacity = math.ceil(cap_rate * inp.shape[0] / self.num_expert)
        _, _, top1_idx = limit_by_capacity(top1_idx, self.num_expert, self.world_size, capacity)
        valid = top1_idx[top1_idx > -1]
        fraction_expert = torch.bincount(valid, minlength=self.tot_expert).float() / valid.numel()
        prob_expert = score.sum(dim=0) / valid.numel()
        self.set_loss((fraction_expert * prob_expert).sum() * self.tot_expert)
        return top1_idx, top1_score
