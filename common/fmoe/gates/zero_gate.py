"""fastmoe's ``ZeroGate``: every slot goes to expert 0 with score ``1 / top_k`` (a test gate)."""

from __future__ import annotations

import torch

from common.fmoe.gates.base_gate import BaseGate


class ZeroGate(BaseGate):
    def __init__(self, _d_model: int, num_expert: int, world_size: int, top_k: int = 2):
        super().__init__(num_expert, world_size)
        self.top_k = top_k

    def forward(self, inp: torch.Tensor):
        """-> idx (tokens·top_k,) all zero, score (tokens, 1, top_k) all ``1/top_k``."""
        idx = torch.zeros(inp.shape[0] * self.top_k, dtype=torch.int64, device=inp.device)
        gate_score = torch.ones(inp.shape[0] * self.top_k, device=inp.device) / self.top_k
        return idx, gate_score.reshape(-1, 1, self.top_k)
