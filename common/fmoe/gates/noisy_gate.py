"""fastmoe's ``NoisyGate``: Shazeer et al.'s noisy top-k gating (2017).

``w_gate`` and ``w_noise`` of shape (d_model, tot_expert); in training the logits get Gaussian noise
of standard deviation ``softplus(x · w_noise) + 0.01``; the top k+1 logits give the k gates (a
softmax over the k) and the thresholds of the differentiable load ``P(expert stays in the top k
under fresh noise)``; the loss is ``cv²(importance) + cv²(load)``.

Where fastmoe misbehaves: in ``eval()`` its noise deviation is 0, so the load divides 0/0 and
``torch.distributions.Normal`` (which validates its arguments by default) raises on the NaN.  Here
the load without noise is what it then means, the count of tokens per expert (not differentiable),
as fastmoe itself uses when ``top_k == tot_expert``.  The ids come flat ``(tokens·k,)`` and the
scores ``(tokens, 1, k)``, as fastmoe hands them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.fmoe.gates.base_gate import BaseGate
from common.moe.routing import check_topk


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
