"""fastmoe's ``fmoe.balance``: load-balance metrics of the per-expert counts ``c_e`` and the profile
dictionary that fastmoe's Megatron hooks fill (``update_balance_profile`` is a stub in fastmoe too)."""

from __future__ import annotations

import torch

metrics = {
    "coefficient-variation": lambda c_e: torch.std(c_e) / torch.mean(c_e),
    "Lmax-over-Lmin": lambda c_e: (torch.max(c_e) + 1) / (torch.min(c_e) + 1),
    "Lmax-over-Lmean": lambda c_e: torch.max(c_e) / torch.mean(c_e),
}


def reset_balance_profile(balance_dict: dict, num_layers: int, balance_strategy) -> None:
    """One empty slot per layer for every metric (and for ``<strategy>_loss`` if a strategy is set)."""
    for key in metrics:
        balance_dict[key] = [None] * num_layers
    if balance_strategy:
        balance_dict[f"{balance_strategy}_loss"] = [None] * num_layers


def update_balance_profile(
    balance_dict, gate_top_k_idx, _gate_score_top_k, gate_context, layer_idx, num_expert, balance_strategy
) -> None:
    """Left for the user to fill, as in fastmoe."""
