"""Auxiliary router losses: the load-balancing loss, the router z-loss, DeepSeek-V3's sequence-wise loss.

The balance loss is Switch Transformer's ``E · Σ_e f_e · P_e``: ``P_e`` is the mean router
probability of expert ``e`` and ``f_e`` the fraction of routed slots that went to ``e``, so both sum
to 1 and a perfectly balanced router scores exactly 1 whatever ``k`` is.  Libraries differ here:

* Hugging Face Mixtral's ``load_balancing_loss_func`` divides the top-k counts by tokens, not slots,
  so its ``f`` sums to ``k`` and its loss is ``k`` times ours;
* DeepSpeed's ``top2gating`` (GShard) counts only each token's *first* choice; pass ``first_only``
  expert indices ``(tokens, 1)`` to get exactly its ``l_aux``.
"""

from __future__ import annotations

import torch


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """``E · Σ_e f_e · P_e``.

    probs: (tokens, E) router probabilities (the gradient flows through these);
    expert_idx: (tokens, k) chosen experts, counted before any capacity drop.
    """
    if probs.dim() != 2 or expert_idx.dim() != 2 or probs.shape[0] != expert_idx.shape[0]:
        raise ValueError(
            f"balance_loss wants probs (tokens, E) and expert_idx (tokens, k), "
            f"got {tuple(probs.shape)} and {tuple(expert_idx.shape)}"
        )
    if probs.shape[0] == 0:  # an empty batch routes nothing: no imbalance (and no 0/0)
        return probs.sum() * 0.0
    num_experts = probs.shape[1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, expert_idx.reshape(-1), torch.ones_like(expert_idx, dtype=probs.dtype).reshape(-1))
    f = counts / expert_idx.numel()  # fraction of slots per expert, sums to 1
    p = probs.mean(dim=0)  # mean probability per expert, sums to 1
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)²``; keeps logits small."""
    if logits.shape[0] == 0:  # an empty batch: nothing to penalise
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sequence_balance_loss(scores: torch.Tensor, expert_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``Σ_i f_i · P_i``, averaged over sequences.

    Within one sequence of T tokens: ``f_i = E / (k·T) · #{t : i in top-k(t)}`` and
    ``P_i = 1/T · Σ_t s'_{i,t}`` with ``s'`` the affinity scores normalised to sum to 1 per token.
    scores: (batch·T, E) unbiased affinities (sigmoid for V3); expert_idx: (batch·T, k).
    """
    tokens, num_experts = scores.shape
    if tokens == 0:  # an empty batch (no sequences, or sequences of no tokens): nothing to balance
        return scores.sum() * 0.0
    if batch < 1 or tokens % batch:
        raise ValueError(f"{tokens} tokens do not split into {batch} sequences")
    k = expert_idx.shape[1]
    s = scores / scores.sum(dim=-1, keepdim=True)
    s = s.view(batch, -1, num_experts)  # (batch, T, E)
    seq_len = s.shape[1]
    counts = torch.zeros(batch, num_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(
        1, expert_idx.view(batch, -1), torch.ones_like(expert_idx, dtype=scores.dtype).view(batch, -1)
    )
    f = counts * num_experts / (k * seq_len)  # (batch, E)
    p = s.mean(dim=1)  # (batch, E)
    return (f * p).sum(dim=-1).mean()
