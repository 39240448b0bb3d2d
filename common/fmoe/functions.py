"""fastmoe's ``fmoe.functions``: counting slots per expert, and moving rows to and from the experts.

fastmoe writes these as CUDA kernels and NCCL calls (``fmoe_cuda``); here they are torch operations
and :mod:`common.fmoe.expert_parallel`'s all-to-all, with fastmoe's names, arguments and results:

* :func:`count_by_gate` -- ``(pos, local_expert_count, global_expert_count)``: ``pos`` (kept,) the
  flat slot indices ``token·top_k + slot`` grouped by global expert (dropped slots, ``-1``, left
  out; in slot order within an expert, where fastmoe's atomics leave the order to its threads),
  the counts (W·E,) this worker sends to every global expert and, after one all-to-all, (W·E,) what
  each sender sends to this worker's experts, laid out (sender, local expert);
* :func:`prepare_forward` -- the same plus ``fwd_expert_count`` (E,) rows per local expert and
  their sum ``fwd_batch_size``, the counts on the CPU as fastmoe hands them to the experts;
* :class:`MOEScatter` / :class:`MOEGather` -- autograd functions: rows to the experts (grouped by
  local expert, over workers when ``world_size > 1``) and the experts' outputs back into slot order;
* :class:`AllGather` / :class:`Slice` -- the tensor-parallel ``slice_group`` pair: each member
  takes its share of the batch, the outputs are gathered again;
* :func:`ensure_comm` / :func:`get_moe_group` -- the expert-parallel group the exchanges use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from common.fmoe.expert_parallel import exchange_counts, global_gather, global_scatter
from common.fmoe.utils import get_torch_default_comm
from common.moe.dispatch import sort_by_expert

_moe_group = None


def ensure_comm(t: torch.Tensor, comm) -> None:
    """Record ``comm`` (None: the default group) as the group the expert exchanges run over.

    fastmoe also builds its NCCL communicator for ``t``'s device here; torch's collectives need none.
    """
    global _moe_group
    _moe_group = get_torch_default_comm() if comm is None else comm


def get_moe_group():
    """The group set by the last :func:`ensure_comm` (None before any)."""
    return _moe_group


def count_by_gate(gate: torch.Tensor, num_expert: int, world_size: int, require_pos: bool = True):
    """gate: expert id per slot, any shape (``-1`` dropped) -> ``(pos, local_expert_count,
    global_expert_count)``; ``pos`` is None unless ``require_pos``."""
    with torch.no_grad():
        order, local_expert_count, _ = sort_by_expert(gate.reshape(-1, 1), num_expert * world_size)
        if world_size > 1:
            global_expert_count = exchange_counts(local_expert_count, world_size, get_moe_group())
        else:
            global_expert_count = local_expert_count
    return (order if require_pos else None), local_expert_count, global_expert_count


def prepare_forward(gate: torch.Tensor, num_expert: int, world_size: int):
    """``(pos, local_expert_count, global_expert_count, fwd_expert_count, fwd_batch_size)``, the
    counts on the CPU: what :class:`MOEScatter` and the experts need."""
    pos, local_expert_count, global_expert_count = count_by_gate(gate, num_expert, world_size)
    with torch.no_grad():
        fwd_expert_count = global_expert_count.view(world_size, num_expert).sum(dim=0)
        fwd_batch_size = int(fwd_expert_count.sum().item())
    return (
        pos,
        local_expert_count.cpu(),
        global_expert_count.cpu(),
        fwd_expert_count.cpu(),
        fwd_batch_size,
    )


def _local_scatter(inp: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return inp.index_select(0, pos)


def _local_gather(inp: torch.Tensor, pos: torch.Tensor, out_batch_size: int, maybe_overlap: bool = True):
    """Rows back to their positions ``pos`` in a zero (out_batch_size, d) buffer; summed where
    ``maybe_overlap`` (several slots of one token), copied otherwise."""
    buf = inp.new_zeros(out_batch_size, inp.shape[-1])
    return buf.index_add_(0, pos, inp) if maybe_overlap else buf.index_copy_(0, pos, inp)


class MOEScatter(Function):
    """(batch, d) -> (fwd_batch_size, d): the rows ``inp[pos]``, exchanged over the workers when
    ``world_size > 1``, grouped by local expert (within an expert by sender)."""

    @staticmethod
    def forward(ctx, inp, pos, local_expert_count, global_expert_count, fwd_batch_size, world_size):
        local_input_buf = _local_scatter(inp, pos)
        if world_size > 1:
            global_input_buf = global_scatter(
                local_input_buf, local_expert_count, global_expert_count, world_size, get_moe_group()
            )
        else:
            global_input_buf = local_input_buf
        ctx.moe_args = inp.shape[0], world_size
        ctx.save_for_backward(pos, local_expert_count, global_expert_count)
        return global_input_buf

    @staticmethod
    def backward(ctx, global_grad_in):
        pos, local_expert_count, global_expert_count = ctx.saved_tensors
        inp_batch_size, world_size = ctx.moe_args
        if world_size > 1:
            local_grad_in = global_gather(
                global_grad_in, local_expert_count, global_expert_count, world_size, get_moe_group()
            )
        else:
            local_grad_in = global_grad_in
        return _local_gather(local_grad_in, pos, inp_batch_size), None, None, None, None, None


class MOEGather(Function):
    """The inverse of :class:`MOEScatter`: (fwd_batch_size, d) expert outputs -> (local_batch_size,
    d) in slot order, zero where a slot was dropped."""

    @staticmethod
    def forward(
        ctx, global_output_buf, pos, local_expert_count, global_expert_count, local_batch_size, world_size
    ):
        if world_size > 1:
            local_output_buf = global_gather(
                global_output_buf, local_expert_count, global_expert_count, world_size, get_moe_group()
            )
        else:
            local_output_buf = global_output_buf
        output = _local_gather(local_output_buf, pos, local_batch_size, maybe_overlap=False)
        ctx.moe_args = world_size
        ctx.save_for_backward(pos, local_expert_count, global_expert_count)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        pos, local_expert_count, global_expert_count = ctx.saved_tensors
        world_size = ctx.moe_args
        grad_out_buf = _local_scatter(grad_out.contiguous(), pos)
        if world_size > 1:
            grad_out_buf = global_scatter(
                grad_out_buf, local_expert_count, global_expert_count, world_size, get_moe_group()
            )
        return grad_out_buf, None, None, None, None, None


class AllGather(Function):
    """Concatenate every group member's ``inp`` along dim 0; backward keeps this member's part."""

    @staticmethod
    def forward(ctx, inp, rank, world_size, group):
        tensor_list = [torch.empty_like(inp) for _ in range(world_size)]
        dist.all_gather(tensor_list, inp.contiguous(), group=group)
        ctx.args = rank, inp.shape[0]
        return torch.cat(tensor_list, dim=0)

    @staticmethod
    def backward(ctx, grad_out):
        rank, dim0 = ctx.args
        return grad_out[rank * dim0 : (rank + 1) * dim0], None, None, None


class Slice(Function):
    """This member's ``batch // world_size`` rows of ``inp``; backward gathers every member's gradient."""

    @staticmethod
    def forward(ctx, inp, rank, world_size, group):
        local_batch_size = inp.shape[0] // world_size
        batch_start = local_batch_size * rank
        ctx.args = world_size, group
        return inp[batch_start : min(batch_start + local_batch_size, inp.shape[0])]

    @staticmethod
    def backward(ctx, grad_out):
        world_size, group = ctx.args
        tensor_list = [torch.empty_like(grad_out) for _ in range(world_size)]
        dist.all_gather(tensor_list, grad_out.contiguous(), group=group)
        return torch.cat(tensor_list, dim=0), None, None, None
