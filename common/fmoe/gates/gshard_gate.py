"""fastmoe's ``GShardGate`` (GShard, Lepikhin et al. 2020), as fastmoe v1.0.1 and later compute it.

NaiveGate's top-2, then:

* the balance loss ``mean_e(c_e · m_e) · num_expert²``: ``c_e`` the share of tokens whose column-0
  choice is ``e``, ``m_e`` the mean softmax probability (:func:`common.moe.losses.balance_loss`
  over column 0, rescaled to fastmoe's mean);
* a capacity of ``ceil(cap · S) · top_k // (world_size · num_expert)`` slots for each global expert
  from this worker's ``S`` tokens (fastmoe v1.0.0 gave every expert ``ceil(cap · S)``, which almost
  never dropped anything): 16 tokens at rate 1.2 on 4 global experts keep 10 slots each;
* random routing: the second slot is dropped where ``2 · score₂ < U(0, 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.fmoe.gates.naive_gate import NaiveGate
from common.fmoe.gates.utils import prune_gate_by_capacity
from common.moe.losses import balance_loss


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
            raise ValueError(f"{type(self).__name__} routes every token to 2 experts, got topk={topk}")
        super().__init__(d_model, num_expert, world_size, top_k=2, gate_bias=gate_bias)
        self.capacity, self.random_routing = capacity, random_routing

    def slots_per_expert(self, tokens: int) -> int:
        """The capacity of each global expert for ``tokens`` of this worker's tokens."""
        cap_rate = self.capacity[0 if self.training else 1]
        return math.ceil(cap_rate * tokens) * self.top_k // (self.world_size * self.num_expert)

    def limit_capacity(self, topk_idx: torch.Tensor, tokens: int) -> torch.Tensor:
        """(tokens, 2) ids -> the same with the slots past each global expert's capacity set to -1."""
        capacity = torch.full((self.tot_expert,), self.slots_per_expert(tokens), device=topk_idx.device)
        return prune_gate_by_capacity(topk_idx, capacity, self.num_expert, self.world_size)

    def forward(self, x: torch.Tensor):
        topk_idx, topk_val, logits = super().forward(x, return_all_scores=True)
        first = topk_idx.view(-1, self.top_k)[:, :1]  # (tokens, 1) column 0, fastmoe's "first choice"
        self.set_loss(balance_loss(F.softmax(logits, dim=1), first) * self.num_expert**2 / self.tot_expert**2)
        topk_idx = self.limit_capacity(topk_idx, x.shape[0])
        if self.random_routing:
            drop_second = 2 * topk_val[:, 1] < torch.rand(x.shape[0], device=x.device)
            topk_idx[:, 1].masked_fill_(drop_second, -1)
        return topk_idx, topk_val
