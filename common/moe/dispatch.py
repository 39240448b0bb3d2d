"""The one dispatch every router uses, and the dense loop it must equal.

:func:`dispatch` (the fast one):

1. flatten the (token, slot) pairs and give dropped slots a sentinel expert ``E``;
2. sort the pairs by expert once (a stable argsort), count them per expert (one host sync):
   :func:`sort_by_expert`, which fastmoe's layers (:mod:`common.fmoe`) use too;
3. gather the token rows in that order, so every expert's tokens sit in one contiguous slice;
4. run each expert on its slice (:meth:`Experts.forward_sorted`: one grouped matmul per
   projection, or a loop over the non-empty experts);
5. weight each row by its routing weight and add it to its token's output (one index_add).

No Python loop over tokens; autograd gives the backward (index_select's backward is an index_add,
the weighting's backward gives the router its gradient).

:func:`dense_loop` is the readable reference: every expert on every token, weighted by a dense
(tokens, experts) combine matrix that is zero where a token did not choose the expert.
"""

from __future__ import annotations

import torch

from common.moe.experts import Experts


def _check(
    x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None
) -> None:
    if x.dim() != 2:
        raise ValueError(f"dispatch wants flat tokens (tokens, d_model), got shape {tuple(x.shape)}")
    if expert_idx.shape != weights.shape or expert_idx.dim() != 2 or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx and weights must both be (tokens={x.shape[0]}, k), "
            f"got {tuple(expert_idx.shape)} and {tuple(weights.shape)}"
        )
    if keep is not None and keep.shape != expert_idx.shape:
        raise ValueError(f"keep must match expert_idx {tuple(expert_idx.shape)}, got {tuple(keep.shape)}")


def dispatch(
    x: torch.Tensor,
    experts: Experts,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fast MoE forward.  x (tokens, d_model); expert_idx, weights, keep (tokens, k).

    Returns ``(out, counts, dropped)``: out (tokens, d_model), counts (E,) slots per expert,
    dropped the number of slots skipped.
    """
    _check(x, expert_idx, weights, keep)
    tokens, k = expert_idx.shape
    num_experts = experts.num_experts
    order, counts, counts_list = sort_by_expert(expert_idx, num_experts, keep)
    kept = len(order)
    token = order // k  # (kept,) source token of each row
    rows = x.index_select(0, token)  # (kept, d_model) grouped
    scale = weights.reshape(-1).index_select(0, order).to(x.dtype)  # (kept,) routing weights
    y = experts.forward_sorted(rows, scale, counts, counts_list)  # (kept, d_model)
    out = x.new_zeros(x.shape).index_add(0, token, y)  # sum each token's slots
    return out, counts, tokens * k - kept


def sort_by_expert(
    expert_idx: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Steps 1-2 of :func:`dispatch`: the kept (token, slot) pairs in expert order, and their counts.

    expert_idx, keep: (tokens, k); a slot whose ``keep`` is False, or whose expert is negative
    (fastmoe's ``-1`` for a dropped slot), is left out.  Returns ``(order, counts, counts_list)``:
    order (kept,) flat slot indices ``token·k + slot`` grouped by expert, in token order within an
    expert; counts (E,) slots per expert, as a tensor and as a list (the one host sync).
    """
    flat_e = expert_idx.reshape(-1)  # (tokens·k,)
    dropped = flat_e < 0
    if keep is not None:
        dropped = dropped | ~keep.reshape(-1)
    flat_e = flat_e.masked_fill(dropped, num_experts)  # dropped -> sentinel E
    order = torch.argsort(flat_e, stable=True)  # (tokens·k,) by expert
    counts = torch.bincount(flat_e, minlength=num_experts + 1)  # (E+1,)
    counts_list = counts.tolist()
    kept = flat_e.numel() - counts_list[num_experts]
    return order[:kept], counts[:num_experts], counts_list[:num_experts]


def dense_loop(
    x: torch.Tensor,
    experts: Experts,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference MoE forward: ``out = Σ_e combine[:, e] · expert_e(x)`` over all experts, all tokens."""
    _check(x, expert_idx, weights, keep)
    if keep is not None:
        weights = weights * keep
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=weights.dtype, device=x.device)
    combine = combine.scatter_add(1, expert_idx, weights)  # (tokens, E)
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        out = out + combine[:, e : e + 1] * experts.expert_forward(e, x)
    return out
