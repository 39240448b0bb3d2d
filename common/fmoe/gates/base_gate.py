"""fastmoe's ``BaseGate``: the interface every gate keeps (``world_size``, ``num_expert``,
``tot_expert``, a loss set during the forward and read once with :meth:`get_loss`)."""

from __future__ import annotations

import torch
from torch import nn


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
            "BaseGate is an interface; use NaiveGate, NoisyGate, GShardGate, SwitchGate or ZeroGate"
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
