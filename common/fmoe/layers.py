"""fastmoe's ``FMoE`` layer (``fmoe.layers``) in plain PyTorch, on one worker or several.

``FMoE(num_expert, d_model, world_size, mp_group, slice_group, moe_group, top_k, gate, expert,
gate_hook, mask, mask_dict, gate_bias)``: ``num_expert`` experts on **each** worker; the gate sees
``num_expert · world_size``.  The input is a tensor (tokens, d_model) or, as in fastmoe, any dict,
list or tuple of such tensors (dm-tree's ``map_structure``): every tensor is routed by the one gate
decision, which the gate takes from the whole structure.  One forward:

1. with a ``slice_group`` of n > 1 members (tensor-model parallelism; ``mp_group`` is its old
   name), each member keeps its ``1/n`` of the batch (:class:`~common.fmoe.functions.Slice`);
2. ``gate_top_k_idx, gate_score = self.gate(x)``: (tokens, top_k) global expert ids (-1 dropped) and
   scores; ``gate_hook(gate_top_k_idx, gate_score, None)`` if given; with ``mask``/``mask_dict``
   the tokens whose mask is not 0 skip the experts and get ``mask_dict[mask value]`` as output;
3. :func:`_fmoe_general_global_forward`: count the slots per expert, copy each token's row once per
   slot into expert order (``MOEScatter``; with ``world_size > 1`` over the all-to-all), run
   ``expert_fn(rows, fwd_expert_count)``, and bring the outputs back (``MOEGather``);
4. ``bmm(gate_score (tokens, 1, k), outputs (tokens, k, d))`` combines each token's k outputs, and
   a slice group all-gathers the batch again.

``expert`` is a module class built as ``expert(d_model)`` once per local expert (a list builds one
of each); each is called as ``expert(rows, torch.tensor([count]))``, fastmoe's convention (with a
dict or list input, ``rows`` is that structure of the expert's rows, where fastmoe's own loop fails).  Without
it, set ``self.experts`` to one module called as ``experts(rows, fwd_expert_count)`` (fused).
fastmoe's FasterMoE schedule (``FMOE_FASTER_SCHEDULE_ENABLE``) needs its CUDA kernels and is not
provided; :meth:`FMoE.expert_fn_single` is, for a schedule that runs one expert at a time.
"""

from __future__ import annotations

import warnings

import torch
import tree
from torch import nn

from common.fmoe.functions import AllGather, MOEGather, MOEScatter, Slice, ensure_comm, prepare_forward
from common.fmoe.gates import NaiveGate


def mark_module_parallel_comm(module: nn.Module, comm: str) -> None:
    """Tag every parameter of ``module`` with ``dp_comm``: the group its gradient is averaged over."""
    for p in module.parameters():
        p.dp_comm = comm


def _fmoe_general_global_forward(inp, gate, expert_fn, num_expert, world_size, **kwargs):
    """Count, scatter to the experts, run ``expert_fn``, gather back: (tokens·k, d) per tensor of
    ``inp`` in slot order, zero for dropped slots.  gate: (tokens,) or (tokens, k) expert ids."""
    pos, local_expert_count, global_expert_count, fwd_expert_count, fwd_batch_size = prepare_forward(
        gate, num_expert, world_size
    )
    topk = gate.shape[1] if gate.dim() == 2 else 1

    def scatter_func(tensor):
        return MOEScatter.apply(
            tensor,
            torch.div(pos, topk, rounding_mode="floor"),  # the token of each slot
            local_expert_count,
            global_expert_count,
            fwd_batch_size,
            world_size,
        )

    x = expert_fn(tree.map_structure(scatter_func, inp), fwd_expert_count)
    out_batch_size = tree.flatten(inp)[0].shape[0] * topk

    def gather_func(tensor):
        return MOEGather.apply(
            tensor, pos, local_expert_count, global_expert_count, out_batch_size, world_size
        )

    return tree.map_structure(gather_func, x)


def _same_batch(structure, what: str) -> None:
    sizes = tree.flatten(tree.map_structure(lambda t: t.shape[0], structure))
    if any(s != sizes[0] for s in sizes):
        raise ValueError(f"MoE {what} must have the same batch size, got {sizes}")


class FMoE(nn.Module):
    def __init__(
        self,
        num_expert: int = 32,
        d_model: int = 1024,
        world_size: int = 1,
        mp_group=None,  # being deprecated: the old name of slice_group
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
        if world_size > 1:
            group_size = (
                torch.distributed.get_world_size(moe_group) if torch.distributed.is_initialized() else 1
            )
            if group_size != world_size:
                raise ValueError(f"world_size={world_size} but the process group has {group_size} workers")
        self.num_expert, self.d_model, self.world_size, self.top_k = num_expert, d_model, world_size, top_k
        self.slice_group = slice_group
        if mp_group is not None:
            warnings.warn("FMoE: mp_group is being deprecated, use slice_group", FutureWarning, stacklevel=2)
            self.slice_group = mp_group
        if self.slice_group is None:
            self.slice_size, self.slice_rank = 1, 0
        else:
            self.slice_size = torch.distributed.get_world_size(self.slice_group)
            self.slice_rank = torch.distributed.get_rank(self.slice_group)
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
        self.gate_hook, self.mask, self.mask_dict, self.moe_group = gate_hook, mask, mask_dict, moe_group

    def expert_fn(self, inp, fwd_expert_count):
        """Run local expert e on the next ``fwd_expert_count[e]`` rows of ``inp``."""
        if self.experts_fused:
            return self.experts(inp, fwd_expert_count)
        counts = [int(c) for c in fwd_expert_count]
        pieces = [t.split(counts) for t in tree.flatten(inp)]  # per tensor of inp: one slice per expert
        outputs = [
            self.experts[e](tree.unflatten_as(inp, [p[e] for p in pieces]), torch.tensor([counts[e]]))
            for e in range(self.num_expert)
        ]
        return tree.map_structure(lambda *ys: torch.cat(ys, dim=0), *outputs)

    def expert_fn_single(self, inp, fwd_expert_count, idx: int):
        """Run the one local expert ``idx`` (a schedule that takes the experts one at a time)."""
        if self.experts_fused:
            raise ValueError("expert_fn_single needs separate experts, not one fused module")
        return self.experts[idx](inp, fwd_expert_count)

    def mark_parallel_comm(self, expert_dp_comm: str = "none") -> None:
        """Experts' gradients are synchronised over ``expert_dp_comm``; the gate's over ``"gate"``."""
        if getattr(self, "experts", None) is not None:
            mark_module_parallel_comm(self.experts, expert_dp_comm)
        mark_module_parallel_comm(self.gate, "gate")

    def forward(self, moe_inp):
        """moe_inp (tokens, d_model), or a dict/list/tuple of them -> the same structure."""
        _same_batch(moe_inp, "inputs")
        if isinstance(moe_inp, torch.Tensor) and (moe_inp.dim() != 2 or moe_inp.shape[-1] != self.d_model):
            raise ValueError(f"FMoE expects (tokens, d_model={self.d_model}), got {tuple(moe_inp.shape)}")
        if self.world_size > 1:
            tree.map_structure(lambda t: ensure_comm(t, self.moe_group), moe_inp)
        if self.slice_size > 1:
            moe_inp = tree.map_structure(
                lambda t: Slice.apply(t, self.slice_rank, self.slice_size, self.slice_group), moe_inp
            )
        gate_top_k_idx, gate_score = self.gate(moe_inp)
        if self.gate_hook is not None:
            self.gate_hook(gate_top_k_idx, gate_score, None)
        gate_top_k_idx = gate_top_k_idx.view(-1, self.top_k)  # NoisyGate and ZeroGate hand it flat
        masked = self.mask is not None and self.mask_dict is not None
        if masked:
            mask = self.mask.view(-1).to(gate_top_k_idx.device)
            moe_inp = tree.map_structure(lambda t: t[mask == 0, :], moe_inp)  # (kept tokens, d)
            gate_top_k_idx = gate_top_k_idx[mask == 0, :]
        fwd = _fmoe_general_global_forward(
            moe_inp, gate_top_k_idx, self.expert_fn, self.num_expert, self.world_size
        )

        def recover_func(tensor):  # (kept·k, d) -> (tokens, k, d), masked tokens from mask_dict
            out = tensor.new_zeros(mask.shape[0], self.top_k, tensor.shape[-1])
            out[mask == 0] = tensor.view(-1, self.top_k, tensor.shape[-1])
            for value, row in self.mask_dict.items():
                out[mask == value] = row.to(out.dtype)
            return out

        if masked:
            moe_outp = tree.map_structure(recover_func, fwd)
        else:
            moe_outp = tree.map_structure(lambda t: t.view(-1, self.top_k, t.shape[-1]), fwd)
        gate_score = gate_score.view(-1, 1, self.top_k)  # (tokens, 1, k)
        moe_outp = tree.map_structure(
            lambda t: torch.bmm(gate_score.to(t.dtype), t).reshape(-1, t.shape[-1]), moe_outp
        )
        if self.slice_size > 1:
            moe_outp = tree.map_structure(
                lambda t: AllGather.apply(t, self.slice_rank, self.slice_size, self.slice_group), moe_outp
            )
        _same_batch(moe_outp, "outputs")
        return moe_outp
