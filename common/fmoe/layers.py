"""fastmoe's ``FMoE`` layer (``fmoe.layers``) in plain PyTorch, on one worker or several.

``FMoE(num_expert, d_model, world_size, top_k, gate, expert, gate_hook, gate_bias, moe_group)``:
``num_expert`` is the number of experts on **each** worker; the gate sees ``num_expert ·
world_size`` experts.  The forward:

1. ``gate_top_k_idx, gate_score = self.gate(x)``: (tokens, top_k) global expert ids (-1 dropped)
   and scores; ``gate_hook(gate_top_k_idx, gate_score, None)`` if given;
2. the (token, slot) pairs are sorted by expert (:func:`common.moe.dispatch.sort_by_expert`) and
   each token's row is copied once per slot (fastmoe's ``MOEScatter``);
3. with ``world_size > 1`` the rows travel to the workers that own their experts
   (:mod:`common.fmoe.expert_parallel`: counts first, then the tokens);
4. ``expert_fn(rows, fwd_expert_count)`` runs each local expert on its contiguous rows;
5. the outputs come back (``MOEGather``) as (tokens·top_k, d_model), zero for dropped slots, and
   ``bmm(gate_score (tokens, 1, k), outputs (tokens, k, d))`` combines each token's k outputs.

``expert`` is a module class built as ``expert(d_model)`` once per local expert (a list builds one
of each) and called on its rows alone; without it, set ``self.experts`` to one module called as
``experts(rows, fwd_expert_count)``.
fastmoe's ``slice_group``/``mask`` options (tensor-model-parallel slicing, masked tokens) are not
part of the book and are refused here.
"""

from __future__ import annotations

import torch
from torch import nn

from common.fmoe.expert_parallel import exchange_counts, global_gather, global_scatter
from common.fmoe.gates import NaiveGate
from common.moe.dispatch import sort_by_expert


def mark_module_parallel_comm(module: nn.Module, comm: str) -> None:
    """Tag every parameter of ``module`` with ``dp_comm``: the group its gradient is averaged over."""
    for p in module.parameters():
        p.dp_comm = comm


class FMoE(nn.Module):
    def __init__(
        self,
        num_expert: int = 32,
        d_model: int = 1024,
        world_size: int = 1,
        mp_group=None,
        slice_group=None,
        moe_group=None,
        top_k: int = 2,
        gate=NaiveGate,
        expert=None,
        gate_hook=None,
        mask=None,
        mask_dict=None,
        gate_bias: bool = True,
    ):
        super().__init__()
        if mp_group is not None or slice_group is not None or mask is not None or mask_dict is not None:
            raise ValueError("slice_group/mp_group and mask/mask_dict are not supported by common.fmoe")
        if world_size > 1:
            group_size = (
                torch.distributed.get_world_size(moe_group) if torch.distributed.is_initialized() else 1
            )
            if group_size != world_size:
                raise ValueError(f"world_size={world_size} but the process group has {group_size} workers")
        self.num_expert, self.d_model, self.world_size, self.top_k = num_expert, d_model, world_size, top_k
        self.slice_size, self.slice_rank, self.slice_group = 1, 0, None
        if isinstance(expert, list):
            self.experts = nn.ModuleList([e(d_model) for e in expert])
            self.experts_fused = False
            self.num_expert = num_expert = len(expert)
        elif expert is not None:
            self.experts = nn.ModuleList([expert(d_model) for _ in range(num_expert)])
            self.experts_fused = False
        else:
            self.experts_fused = True
        if isinstance(gate, type) and issubclass(gate, NaiveGate):
            self.gate = gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
        else:
            self.gate = gate(d_model, num_expert, world_size, top_k)
        self.gate_hook, self.moe_group = gate_hook, moe_group

    def expert_fn(self, inp: torch.Tensor, fwd_expert_count: list[int]) -> torch.Tensor:
        """Run local expert e on the next ``fwd_expert_count[e]`` rows of ``inp``."""
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        outputs = [self.experts[e](x) for e, x in enumerate(inp.split(fwd_expert_count))]
        return torch.cat(outputs, dim=0)

    def mark_parallel_comm(self, expert_dp_comm: str = "none") -> None:
        """Experts' gradients are synchronised over ``expert_dp_comm``; the gate's over ``"gate"``."""
        if getattr(self, "experts", None) is not None:
            mark_module_parallel_comm(self.experts, expert_dp_comm)
        mark_module_parallel_comm(self.gate, "gate")

    def forward(self, moe_inp: torch.Tensor) -> torch.Tensor:
        """moe_inp (tokens, d_model) -> (tokens, d_model)."""
        if moe_inp.dim() != 2 or moe_inp.shape[-1] != self.d_model:
            raise ValueError(f"FMoE expects (tokens, d_model={self.d_model}), got {tuple(moe_inp.shape)}")
        gate_top_k_idx, gate_score = self.gate(moe_inp)
        if self.gate_hook is not None:
            self.gate_hook(gate_top_k_idx, gate_score, None)
        tokens, k = moe_inp.shape[0], self.top_k
        idx = gate_top_k_idx.reshape(tokens, k)  # (tokens, k); NoisyGate hands it flat
        out = self._global_forward(moe_inp, idx)  # (tokens·k, d_model) in slot order
        gate_score = gate_score.reshape(tokens, 1, k).to(out.dtype)  # (tokens, 1, k)
        return torch.bmm(gate_score, out.view(tokens, k, -1)).reshape(tokens, -1)

    def _global_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every kept slot's expert output, (tokens·k, d_model) in slot order, zero where dropped."""
        tot_expert, k = self.num_expert * self.world_size, idx.shape[1]
        order, local_expert_count, counts_list = sort_by_expert(idx, tot_expert)  # (kept,), (W·E,)
        rows = x.index_select(0, order // k)  # (kept, d_model), grouped by global expert
        if self.world_size > 1:
            global_expert_count = exchange_counts(local_expert_count, self.world_size, self.moe_group)
            rows = global_scatter(
                rows, local_expert_count, global_expert_count, self.world_size, self.moe_group
            )
            fwd_expert_count = global_expert_count.view(self.world_size, -1).sum(0).tolist()
        else:
            fwd_expert_count = counts_list
        y = self.expert_fn(rows, fwd_expert_count)  # (received, d_model)
        if self.world_size > 1:
            y = global_gather(y, local_expert_count, global_expert_count, self.world_size, self.moe_group)
        return x.new_zeros(idx.numel(), y.shape[-1]).index_copy(0, order, y)
