"""MoE layers: a router, a bank of experts, the fast dispatch, optional shared experts.

Every layer maps x (batch, seq, d_model) to ``(out, aux_loss)``: ``out`` (batch, seq, d_model) and
``aux_loss``, a scalar tensor, the router's auxiliary losses already times their coefficients (0 in
eval mode, so validation losses stay pure cross-entropy).  That is what ``DecoderLM(config,
ffn_factory=...)`` plugs in: each block hands its layer's ``aux_loss`` up and the model adds them to
the cross-entropy, so the loss a reader backpropagates is built from returned values, as DeepSpeed's
``MoE`` returns ``(out, l_aux, exp_counts)``.

What a reader inspects and no loss needs is recorded on the layer by each forward, the way
transformers records Mixtral's router logits with hooks instead of threading them through every
block's return:

* ``self.last_routing``: the :class:`~common.moe.routing.Routing` (chosen experts, weights, kept
  slots, router logits);
* ``self.last_stats``: an :class:`~common.moe.stats.ExpertLoad` (tokens per expert, max/mean,
  coefficient of variation, dropped fraction) and ``self.last_losses`` (the unweighted loss terms).

A model of many layers would otherwise have to return every layer's diagnostics from its forward.

Four named layers, one per router, each with ``from_hf(module)`` to load a transformers module's
weights into it:

=================  ==========================  ==========================================
layer              router                      ``from_hf`` takes
=================  ==========================  ==========================================
``TopKMoE``        :class:`TopKRouter`         ``MixtralSparseMoeBlock``
``SwitchMoE``      :class:`SwitchRouter`       ``SwitchTransformersSparseMLP``
``GShardMoE``      :class:`GShardRouter`       (none in transformers; tested against DeepSpeed)
``DeepSeekMoE``    :class:`DeepSeekRouter`     ``DeepseekV3MoE``
=================  ==========================  ==========================================
"""

from __future__ import annotations

import torch
from torch import nn

from common.moe.deepseek_router import DeepSeekRouter
from common.moe.dispatch import dense_loop, dispatch
from common.moe.experts import Experts, SwiGLU
from common.moe.gshard_router import GShardRouter
from common.moe.stats import ExpertLoad
from common.moe.switch_router import SwitchRouter
from common.moe.topk_router import TopKRouter

DROPPED = ("zero", "passthrough")


class MoELayer(nn.Module):
    """router + experts (+ shared experts).  ``dropped``: what a token with every slot dropped outputs
    from this layer: ``"zero"`` (the residual stream carries it) or ``"passthrough"`` (its input)."""

    def __init__(
        self, router: nn.Module, experts: Experts, shared: nn.Module | None = None, dropped: str = "zero"
    ):
        super().__init__()
        if dropped not in DROPPED:
            raise ValueError(f"dropped must be one of {DROPPED}, got {dropped!r}")
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts, the expert bank {experts.num_experts}"
            )
        self.router, self.experts, self.shared, self.dropped = router, experts, shared, dropped
        self.last_stats: ExpertLoad | None = None
        self.last_losses: dict[str, torch.Tensor] = {}
        self.last_routing = None  # the last Routing, for inspection

    def forward(self, x: torch.Tensor, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, d_model) -> (out (batch, seq, d_model), aux_loss).  ``reference=True`` runs
        the dense loop instead of the dispatch."""
        if x.dim() != 3 or x.shape[-1] != self.experts.d_model:
            raise ValueError(f"MoE layer wants (batch, seq, {self.experts.d_model}), got {tuple(x.shape)}")
        batch, seq, d_model = x.shape
        flat = x.reshape(-1, d_model)  # (batch·seq, d_model)
        r = self.router(flat, batch=batch)
        if reference:
            out = dense_loop(flat, self.experts, r.expert_idx, r.weights, r.keep)
            kept = r.expert_idx if r.keep is None else r.expert_idx[r.keep]
            counts = torch.bincount(kept.reshape(-1), minlength=self.experts.num_experts)
            dropped = r.expert_idx.numel() - kept.numel()
        else:
            out, counts, dropped = dispatch(flat, self.experts, r.expert_idx, r.weights, r.keep)
        if self.dropped == "passthrough" and r.keep is not None:
            out = out + flat * (~r.keep.any(dim=-1, keepdim=True)).to(flat.dtype)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.last_stats = ExpertLoad(counts.detach(), dropped, r.expert_idx.numel())
        self.last_losses = r.losses
        self.last_routing = r
        aux_loss = r.aux_loss if self.training else r.aux_loss.new_zeros(())
        return out.view(batch, seq, d_model), aux_loss


class TopKMoE(MoELayer):
    """Mixtral-style top-k MoE: softmax router, renormalised top-k, SwiGLU experts, nothing dropped."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        normalize: bool = True,
        balance_coef: float = 0.01,
        z_coef: float = 0.0,
        kind: str = "swiglu",
    ):
        super().__init__(
            TopKRouter(d_model, num_experts, k, normalize, balance_coef, z_coef),
            Experts(num_experts, d_model, d_ff, kind),
        )

    @classmethod
    def from_hf(cls, block, **kwargs) -> TopKMoE:
        """Build from a transformers ``MixtralSparseMoeBlock`` with its weights."""
        w = block.gate.weight  # (E, d_model)
        gate_up = block.experts.gate_up_proj  # (E, 2·d_ff, d_model), gate rows first
        layer = cls(w.shape[1], gate_up.shape[1] // 2, w.shape[0], block.top_k, **kwargs)
        with torch.no_grad():
            layer.router.weight.copy_(w)
            layer.experts.gate_up.copy_(gate_up)
            layer.experts.down.copy_(block.experts.down_proj)
        return layer.to(w.dtype)


class SwitchMoE(MoELayer):
    """Switch Transformer top-1 MoE with capacity; T5-style ReLU experts by default."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        jitter: float = 0.01,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        kind: str = "relu",
        dropped: str = "zero",
        bias: bool = False,
        per_sequence: bool = False,
        expert_capacity: int | None = None,
    ):
        super().__init__(
            SwitchRouter(
                d_model,
                num_experts,
                capacity_factor,
                jitter,
                balance_coef,
                z_coef,
                bias,
                per_sequence,
                expert_capacity,
            ),
            Experts(num_experts, d_model, d_ff, kind),
            dropped=dropped,
        )

    @classmethod
    def from_hf(cls, mlp, **kwargs) -> SwitchMoE:
        """Build from a transformers ``SwitchTransformersSparseMLP`` with its weights.

        Capacity follows transformers: a fixed ``expert_capacity`` per sequence.
        """
        router = mlp.router
        first = mlp.experts["expert_0"]
        act = type(first.act).__name__.lower()
        kind = "relu" if "relu" in act else "gelu" if "gelu" in act else None
        if kind is None:
            raise ValueError(f"unsupported Switch expert activation {type(first.act).__name__}")
        d_ff, d_model = first.wi.weight.shape
        kwargs = {
            "jitter": router.jitter_noise,
            "kind": kind,
            "bias": router.classifier.bias is not None,
            "per_sequence": True,
            "expert_capacity": router.expert_capacity,
            **kwargs,
        }
        layer = cls(d_model, d_ff, router.num_experts, **kwargs)
        with torch.no_grad():
            layer.router.classifier.load_state_dict(router.classifier.state_dict())
            for e in range(router.num_experts):
                layer.experts.gate_up[e].copy_(mlp.experts[f"expert_{e}"].wi.weight)
                layer.experts.down[e].copy_(mlp.experts[f"expert_{e}"].wo.weight)
        return layer.to(first.wi.weight.dtype)


class GShardMoE(MoELayer):
    """GShard top-2 MoE: capacity, random routing of the second expert; SwiGLU experts by default."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        random_routing: bool = True,
        balance_coef: float = 0.01,
        z_coef: float = 0.0,
        kind: str = "swiglu",
        dropped: str = "zero",
        seed: int | None = None,
    ):
        super().__init__(
            GShardRouter(d_model, num_experts, capacity_factor, random_routing, balance_coef, z_coef, seed),
            Experts(num_experts, d_model, d_ff, kind),
            dropped=dropped,
        )


class DeepSeekMoE(MoELayer):
    """DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

    ``d_expert`` is one routed expert's width; the shared experts are one SwiGLU of width
    ``n_shared · d_expert`` (as transformers' DeepseekV3MoE).  For "m·N experts of 1/m width"
    use :meth:`fine_grained`.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        num_experts: int,
        k: int,
        n_shared: int = 1,
        scoring: str = "sigmoid",
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_speed: float = 0.0,
        seq_balance_coef: float = 0.0,
        balance_coef: float = 0.0,
    ):
        if n_shared < 0:
            raise ValueError(f"n_shared must be >= 0, got {n_shared}")
        super().__init__(
            DeepSeekRouter(
                d_model,
                num_experts,
                k,
                scoring,
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
                bias_update_speed,
                seq_balance_coef,
                balance_coef,
            ),
            Experts(num_experts, d_model, d_expert, "swiglu"),
            SwiGLU(d_model, n_shared * d_expert) if n_shared else None,
        )

    @classmethod
    def fine_grained(cls, d_model: int, d_ff: int, num_experts: int, k: int, m: int, **kwargs) -> DeepSeekMoE:
        """Split each of ``num_experts`` experts of width ``d_ff`` into ``m``: m·N experts of width
        d_ff/m, top-(m·k), so the active parameters per token stay those of top-k."""
        if m < 1 or d_ff % m:
            raise ValueError(f"the split m={m} must divide d_ff={d_ff}")
        return cls(d_model, d_ff // m, num_experts * m, k * m, **kwargs)

    @classmethod
    def from_hf(cls, moe, **kwargs) -> DeepSeekMoE:
        """Build from a transformers ``DeepseekV3MoE`` (sigmoid scoring) with its weights and bias."""
        g = moe.gate
        gate_up = moe.experts.gate_up_proj  # (E, 2·d_expert, d_model)
        d_expert = gate_up.shape[1] // 2
        shared = moe.shared_experts
        n_shared = shared.gate_proj.weight.shape[0] // d_expert
        layer = cls(
            g.hidden_dim,
            d_expert,
            g.num_experts,
            g.top_k,
            n_shared,
            "sigmoid",
            g.num_group,
            g.topk_group,
            g.norm_topk_prob,
            g.routed_scaling_factor,
            **kwargs,
        )
        with torch.no_grad():
            layer.router.weight.copy_(g.weight)
            layer.router.e_score_correction_bias.copy_(g.e_score_correction_bias)
            layer.experts.gate_up.copy_(gate_up)
            layer.experts.down.copy_(moe.experts.down_proj)
            layer.shared.load_state_dict(shared.state_dict())
        return layer.to(gate_up.dtype)
