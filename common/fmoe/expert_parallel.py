"""Expert parallelism: every worker holds ``num_expert`` experts, and tokens travel to them by all-to-all.

A token's global expert id ``g`` lives on worker ``g // num_expert`` as its local expert
``g % num_expert``.  One MoE layer's forward on ``world_size`` workers:

1. each worker counts the slots it sends to every global expert: ``local_expert_count`` (W·E,);
2. **counts first**: one all-to-all of those counts tells every worker how many rows each peer will
   send to each of *its* experts: ``global_expert_count`` (W·E,), laid out (sender, local expert);
3. **then the tokens**: rows sorted by global expert (so by destination worker) go out in one
   ``all_to_all_single`` whose split sizes come from the counts; what arrives is grouped by sender,
   then expert, and is reordered so that each local expert's rows are contiguous;
4. the experts run, and the same path is walked back (reorder, all-to-all) to the senders.

The all-to-all is an autograd function whose backward is the reverse all-to-all (send and receive
sizes swapped), so gradients travel back to the workers that own the tokens.  Gloo carries it on
a CPU, NCCL on GPUs; nothing here depends on which.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_experts(total_experts: int, world_size: int) -> int:
    """Experts per worker; the total must split evenly over the workers."""
    if world_size < 1 or total_experts < 1:
        raise ValueError(f"need >= 1 expert and >= 1 worker, got {total_experts} and {world_size}")
    if total_experts % world_size:
        raise ValueError(
            f"{total_experts} experts do not divide evenly over {world_size} workers "
            f"(expert parallelism puts total/world_size experts on each)"
        )
    return total_experts // world_size


def check_ep_size(ep_size: int, world_size: int) -> None:
    """DeepSpeed's expert-parallel groups: ``ep_size`` workers share one copy of the experts."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world_size}")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows ``x[sum(send[:w]) : sum(send[:w+1])]`` go to worker w; returns the rows received, by sender."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def exchange_counts(local_expert_count: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """(W·E,) slots this worker sends to each global expert -> (W·E,) each sender sends to my experts."""
    global_expert_count = torch.empty_like(local_expert_count)
    dist.all_to_all_single(global_expert_count, local_expert_count.contiguous(), group=group)
    return global_expert_count


def _expert_major(global_expert_count: torch.Tensor, world_size: int) -> torch.Tensor:
    """Permutation taking received rows from (sender, expert) order to (expert, sender) order."""
    num_expert = global_expert_count.numel() // world_size
    segment = torch.repeat_interleave(
        torch.arange(world_size * num_expert, device=global_expert_count.device), global_expert_count
    )  # (rows,) sender·E + expert of each received row
    key = (segment % num_expert) * world_size + segment // num_expert  # expert·W + sender
    return torch.argsort(key, stable=True)


def global_scatter(rows, local_expert_count, global_expert_count, world_size: int, group=None):
    """Rows sorted by global expert -> this worker's experts' rows, grouped by local expert."""
    send = local_expert_count.view(world_size, -1).sum(1).tolist()
    recv = global_expert_count.view(world_size, -1).sum(1).tolist()
    received = all_to_all(rows, send, recv, group)  # (received, d) by sender, then expert
    return received.index_select(0, _expert_major(global_expert_count, world_size))


def global_gather(rows, local_expert_count, global_expert_count, world_size: int, group=None):
    """The inverse of :func:`global_scatter`: expert outputs go back to the workers that sent the rows."""
    send = global_expert_count.view(world_size, -1).sum(1).tolist()
    recv = local_expert_count.view(world_size, -1).sum(1).tolist()
    perm = _expert_major(global_expert_count, world_size)
    by_sender = torch.zeros_like(rows).index_copy(0, perm, rows)  # back to (sender, expert) order
    return all_to_all(by_sender, send, recv, group)
