"""fastmoe's Megatron weight initialisers (``fmoe.megatron.layers``), which need no Megatron-LM.

Both draw from a numpy ``Generator`` (Megatron seeds torch for its own purposes), with fastmoe's
names: ``_megatron_init_method(linear, rng, sigma)`` sets the weight to ``N(0, sigma)`` and the bias
to zero; ``_random_init_weight(linear, rng)`` draws as ``nn.init.kaiming_uniform_(a=√5)`` and
``nn.Linear``'s bias would, from the first expert's fan-in (FMoELinear's (E, out, in) weight).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _megatron_init_method(self, rng, sigma: float) -> None:
    weight = rng.normal(loc=0.0, scale=sigma, size=tuple(self.weight.size()))
    self.weight.data = torch.from_numpy(weight).to(dtype=self.weight.dtype, device=self.weight.device)
    if self.bias is not None:
        with torch.no_grad():
            self.bias.zero_()


def _random_init_weight(self, rng) -> None:
    fan_in = self.weight[0][0].numel()  # weight (E, out, in): the first expert's inputs per output
    bound = math.sqrt(3.0) * nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
    weight = rng.uniform(-bound, bound, size=tuple(self.weight.size()))
    self.weight.data = torch.from_numpy(weight).to(dtype=self.weight.dtype, device=self.weight.device)
    if self.bias is not None:
        bound = 1 / math.sqrt(fan_in)
        bias = rng.uniform(-bound, bound, size=tuple(self.bias.size()))
        self.bias.data = torch.from_numpy(bias).to(dtype=self.bias.dtype, device=self.bias.device)
