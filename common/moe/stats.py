"""Expert load statistics that every MoE layer records after each forward (``layer.last_stats``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertLoad:
    """Tokens each expert computed in one forward, and how many routed slots were dropped.

    ``counts`` stays a tensor (no host sync in the forward); the properties turn it into floats.
    """

    counts: torch.Tensor  # (num_experts,) slots each expert computed
    dropped: int  # slots dropped by capacity or random routing
    slots: int  # tokens · k: the slots the router filled

    @property
    def max_over_mean(self) -> float:
        """Load of the busiest expert over the mean load: 1.0 is perfect balance."""
        c = self.counts.float()
        return float(c.max() / c.mean().clamp_min(1e-9))

    @property
    def cv(self) -> float:
        """Coefficient of variation of the loads (std / mean, population std)."""
        c = self.counts.float()
        return float(c.std(unbiased=False) / c.mean().clamp_min(1e-9))

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.slots, 1)

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.counts.tolist(),
            "max_over_mean": self.max_over_mean,
            "cv": self.cv,
            "dropped_fraction": self.dropped_fraction,
        }


def merge_loads(loads: list[ExpertLoad]) -> dict:
    """Summary over several layers (e.g. every MoE layer of a model): mean and worst max/mean, drops."""
    if not loads:
        raise ValueError("merge_loads needs at least one ExpertLoad")
    mm = [ld.max_over_mean for ld in loads]
    return {
        "layers": len(loads),
        "max_over_mean_mean": sum(mm) / len(mm),
        "max_over_mean_worst": max(mm),
        "cv_mean": sum(ld.cv for ld in loads) / len(loads),
        "dropped_fraction": sum(ld.dropped for ld in loads) / max(sum(ld.slots for ld in loads), 1),
    }
