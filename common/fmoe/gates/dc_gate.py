"""fastmoe's ``DCGate`` (distributed capacity): GShardGate's loss and random routing, with a
capacity of ``ceil(cap · S)`` slots per local expert counted over what every worker sends it
(:func:`~common.fmoe.gates.utils.limit_by_capacity`) instead of per worker."""

from __future__ import annotations

import math

import torch

from common.fmoe.gates.gshard_gate import GShardGate
from common.fmoe.gates.utils import limit_by_capacity


class DCGate(GShardGate):
    def limit_capacity(self, topk_idx: torch.Tensor, tokens: int) -> torch.Tensor:
        cap_rate = self.capacity[0 if self.training else 1]
        return limit_by_capacity(topk_idx, self.num_expert, self.world_size, math.ceil(cap_rate * tokens))[2]
