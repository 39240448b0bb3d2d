"""What every router hands to the dispatch: which experts each token goes to, and with what weight.

All routers in :mod:`common.moe` return a :class:`Routing`.  Tokens are flat, ``(tokens, d_model)``;
each token has ``k`` slots.  A slot that a capacity limit or random routing dropped has ``keep`` False
and weight 0, and the dispatch skips it (no expert computes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    expert_idx: torch.Tensor  # (tokens, k) int64: the chosen expert of every slot
    weights: torch.Tensor  # (tokens, k) combine weights, 0 where the slot is dropped
    keep: torch.Tensor | None  # (tokens, k) bool, False where a slot is dropped; None: nothing dropped
    logits: torch.Tensor  # (tokens, num_experts) fp32 router logits
    aux_loss: torch.Tensor  # scalar: the auxiliary losses, each already times its coefficient
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # the same terms, unweighted, detached


def expert_capacity(capacity_factor: float, tokens: int, num_experts: int, k: int = 1) -> int:
    """Slots per expert: ``ceil(capacity_factor · k · tokens / num_experts)``.

    With ``k = 1`` this is Switch Transformer's capacity; with ``k = 2`` it is DeepSpeed's
    ``top2gating`` capacity (which doubles the factor), i.e. room for every token's two choices.
    """
    check_capacity_factor(capacity_factor)
    check_topk(k, num_experts)
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return math.ceil(capacity_factor * k * tokens / num_experts)  # 0 for an empty batch


def check_capacity_factor(capacity_factor: float) -> None:
    """A capacity factor is a finite positive number (NaN and infinity are refused here, not in forward)."""
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")


def positions_in_expert(one_hot: torch.Tensor) -> torch.Tensor:
    """Position (0-based) of each token in the queue of the expert it chose, in token order.

    ``one_hot``: (..., tokens, num_experts) 0/1 choices; returns (..., tokens) int64.  A token's
    position counts the earlier tokens that chose the same expert, so "dropped once an expert is
    full" means "dropped by position": the last tokens of the batch lose.
    """
    return ((one_hot.cumsum(dim=-2) - 1) * one_hot).sum(dim=-1)


def check_topk(k: int, num_experts: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"top-k must be between 1 and the number of experts ({num_experts}), got k={k}")
