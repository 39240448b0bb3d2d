"""fastmoe's capacity limits (``fmoe.gates.utils`` and the ``fmoe_cuda`` kernels behind them).

* :func:`prune_gate_by_capacity` -- keep, of the slots that chose global expert ``e``, the first
  ``expert_count[e]``; the rest become ``-1``.  fastmoe's kernel takes them in whatever order its
  threads win an atomic counter; we take them in (token, slot) order, the order it approximates.
* :func:`cap_global_expert_count` -- the counts ``(sender, local expert)`` that arrive at this
  worker, cut so that each local expert receives at most ``capacity[e]`` rows in all: fastmoe's
  kernel serves the senders in the order their threads run; we serve sender 0 first.
* :func:`limit_by_capacity` -- both, over the workers: count, exchange, cap what each expert
  receives from everyone, send the allowance back, prune.  Returns fastmoe's ``(new_lec, new_gec,
  topk_idx)``.  Two workers that each send 8 slots to expert 0 of capacity 4 keep 4 in all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.fmoe.expert_parallel import exchange_counts
from common.fmoe.functions import count_by_gate, get_moe_group
from common.moe.routing import positions_in_expert


def prune_gate_by_capacity(
    topk_idx: torch.Tensor, expert_count: torch.Tensor, num_expert: int, world_size: int
) -> torch.Tensor:
    """topk_idx (tokens, k) global expert ids (-1 already dropped), expert_count (W·E,) slots each
    global expert may take -> a new (tokens, k) with the slots past the allowance set to -1."""
    tot_expert = num_expert * world_size
    flat = topk_idx.reshape(-1)
    one_hot = F.one_hot(flat.clamp_min(0), tot_expert) * (flat >= 0).unsqueeze(-1)  # (tokens·k, W·E)
    allowed = expert_count.to(flat.device).long()[flat.clamp_min(0)]  # (tokens·k,)
    over = positions_in_expert(one_hot) >= allowed
    return flat.masked_fill(over | (flat < 0), -1).view_as(topk_idx)


def cap_global_expert_count(
    global_expert_count: torch.Tensor, capacity: torch.Tensor, num_expert: int, world_size: int
) -> torch.Tensor:
    """(W·E,) rows each sender proposes to each local expert -> the rows each may send, so that
    local expert e takes at most ``capacity[e]`` in all, senders served in rank order."""
    proposed = global_expert_count.view(world_size, num_expert)  # (sender, local expert)
    before = proposed.cumsum(0) - proposed  # rows earlier senders proposed
    left = (capacity.to(proposed.device).long().view(1, num_expert) - before).clamp_min(0)
    return torch.minimum(proposed, left).reshape(-1)


def limit_by_capacity(topk_idx: torch.Tensor, num_expert: int, world_size: int, capacity: int):
    """Each local expert receives at most ``capacity`` rows from all workers together.

    topk_idx (tokens, k) -> ``(new_lec, new_gec, topk_idx)``: the (W·E,) counts this worker may
    send and may receive, and the pruned ids."""
    with torch.no_grad():
        cap = torch.full((num_expert,), int(capacity), dtype=torch.long, device=topk_idx.device)
        _, _, gec = count_by_gate(topk_idx, num_expert, world_size, require_pos=False)
        new_gec = cap_global_expert_count(gec, cap, num_expert, world_size)
        if world_size > 1:
            new_lec = exchange_counts(new_gec, world_size, get_moe_group())
        else:
            new_lec = new_gec
        topk_idx = prune_gate_by_capacity(topk_idx, new_lec, num_expert, world_size)
    return new_lec, new_gec, topk_idx
