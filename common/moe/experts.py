"""A bank of feed-forward experts stored as stacked weights, one slice per expert.

Stacked ``(num_experts, out, in)`` weights, as transformers v5 stores Mixtral's and DeepSeek-V3's
experts, let the dispatch run each expert on one contiguous slice of sorted tokens.

Two expert kinds:

* ``"swiglu"`` (Mixtral, DeepSeek): ``down(silu(x·W_gateᵀ) ⊙ x·W_upᵀ)``; gate and up are stored fused
  as ``gate_up`` of shape (E, 2·d_ff, d_model), gate rows first (the transformers v5 layout);
* ``"relu"`` / ``"gelu"`` (Switch Transformer's T5 feed-forward): ``down(act(x·W_upᵀ))``,
  ``up`` of shape (E, d_ff, d_model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}
EXPERT_KINDS = ("swiglu", *ACTIVATIONS)


class Experts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        kind: str = "swiglu",
        use_grouped_mm: bool | None = None,
    ):
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"unknown expert kind {kind!r}; choose one of {EXPERT_KINDS}")
        if min(num_experts, d_model, d_ff) < 1:
            raise ValueError(
                f"num_experts, d_model and d_ff must be >= 1, got {num_experts}, {d_model}, {d_ff}"
            )
        self.num_experts, self.d_model, self.d_ff, self.kind = num_experts, d_model, d_ff, kind
        # None: use torch's grouped matmul where it exists (torch >= 2.10 on CPU); False: the loop
        self.use_grouped_mm = hasattr(F, "grouped_mm") if use_grouped_mm is None else use_grouped_mm
        up_rows = 2 * d_ff if kind == "swiglu" else d_ff
        self.gate_up = nn.Parameter(
            torch.empty(num_experts, up_rows, d_model)
        )  # (E, 2·d_ff or d_ff, d_model)
        self.down = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # (E, d_model, d_ff)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # what nn.Linear does, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.gate_up, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def _hidden(self, x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        """The expert's hidden activations: (rows, d_model) -> (rows, d_ff)."""
        h = x @ gate_up.transpose(-2, -1)  # (rows, 2·d_ff) or (rows, d_ff)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return ACTIVATIONS[self.kind](h)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (rows, d_model): the readable one-expert form."""
        return self._hidden(x, self.gate_up[e]) @ self.down[e].T

    def forward_sorted(
        self, x: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor, counts_list: list[int]
    ) -> torch.Tensor:
        """Run the experts on rows sorted by expert: expert e gets the next ``counts[e]`` rows.

        x: (rows, d_model), rows = sum(counts); each row's output is multiplied by ``scale``
        (rows,), its routing weight.  The down projection is linear, so the weight can go on its
        input (rows, d_ff) or its output (rows, d_model): it goes on the narrower of the two.
        ``counts`` (E,) comes as a tensor and as a list.  Where torch has ``F.grouped_mm`` (CPU
        here) each projection is one grouped matmul over all experts; elsewhere a loop runs one
        expert per contiguous slice.
        """
        scale = scale.unsqueeze(-1)  # (rows, 1)
        scale_hidden = self.d_ff <= self.d_model
        if self.use_grouped_mm and x.device.type == "cpu":
            offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert
            h = self._hidden_grouped(x, offsets)  # (rows, d_ff)
            y = F.grouped_mm(h * scale if scale_hidden else h, self.down.transpose(1, 2), offs=offsets)
            return y if scale_hidden else y * scale  # (rows, d_model)
        # unbind once: indexing gate_up[e] per expert would build a full-size zero gradient per expert
        gate_up, down = self.gate_up.unbind(0), self.down.unbind(0)
        outs = []
        for e, (xe, se) in enumerate(zip(x.split(counts_list), scale.split(counts_list))):
            if counts_list[e]:
                h = self._hidden(xe, gate_up[e])
                outs.append((h * se) @ down[e].T if scale_hidden else (h @ down[e].T) * se)
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)

    def _hidden_grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = F.grouped_mm(x, self.gate_up.transpose(1, 2), offs=offsets)  # (rows, 2·d_ff or d_ff)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return ACTIVATIONS[self.kind](h)


class SwiGLU(nn.Module):
    """One dense SwiGLU feed-forward (DeepSeek's shared experts), Llama/DeepSeek layout."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
