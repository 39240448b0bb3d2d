"""fastmoe's ``DistributedGroupedDataParallel``: gradients synchronised per ``dp_comm`` tag.

Expert parallelism breaks plain data parallelism: the gate and the attention are replicated on
every worker (their gradients must be averaged), while each worker's experts are its own (their
gradients must not be).  Every parameter carries a ``dp_comm`` tag
(:func:`common.fmoe.layers.mark_module_parallel_comm`): ``"none"`` (a worker's own experts: left
alone), or the name of a group passed as ``<name>_group=`` (``dp``, ``gate``, ``moe``, ``world``
default to the whole world; fastmoe's tests add ``mp``); an untagged parameter counts as ``"dp"``.
Call :meth:`allreduce_gradients` (alias :meth:`allreduce_params`) after ``backward`` and before
the optimizer step: each group's gradients are flattened by dtype, summed over the group and
divided by its size (before the sum, or after it with ``reduce_after``; not at all with
``no_scale``), in float32 with ``fp32_allreduce``.  The module's parameters are broadcast from each
group's first rank at construction (``need_sync``), so replicas start equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from common.fmoe.utils import get_rank_0_in_comm, get_torch_default_comm

GROUPS = ("dp", "gate", "moe", "world")


class DistributedGroupedDataParallel(nn.Module):
    def __init__(self, module: nn.Module, auto_allreduce: bool = False, need_sync: bool = True, **kwargs):
        if auto_allreduce:
            raise ValueError("automatic all-reduce is not implemented (fastmoe has none either)")
        super().__init__()
        self.module = module
        self.comms = {k[: -len("_group")]: g for k, g in kwargs.items() if k.endswith("_group")}
        for name in GROUPS:
            self.comms.setdefault(name, get_torch_default_comm())
        if need_sync:
            self._sync_params()

    def _grouped(self, with_grad: bool) -> dict:
        groups: dict = {}
        for p in self.module.parameters():
            if with_grad and (not p.requires_grad or p.grad is None):
                continue
            comm = getattr(p, "dp_comm", "dp")
            if comm in self.comms:
                groups.setdefault((comm, p.dtype), []).append(p)
        return groups

    def allreduce_gradients(
        self, no_scale: bool = False, reduce_after: bool = False, fp32_allreduce: bool = False
    ):
        """Sum each tagged group's gradients over its workers, divided by its size unless ``no_scale``."""
        for (comm, dtype), params in self._grouped(with_grad=True).items():
            group = self.comms[comm]
            grads = [p.grad.data for p in params]
            flat = _flatten_dense_tensors(grads)
            if fp32_allreduce and dtype != torch.float32:
                flat = flat.float()
            size = dist.get_world_size(group)
            if not no_scale and not reduce_after:
                flat /= size
            dist.all_reduce(flat, group=group)
            if not no_scale and reduce_after:
                flat /= size
            for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(s)

    def allreduce_params(self, *args, **kwargs):
        """fastmoe's older name of :meth:`allreduce_gradients`."""
        return self.allreduce_gradients(*args, **kwargs)

    def _sync_params(self) -> None:
        for (comm, _), params in self._grouped(with_grad=False).items():
            data = [p.data for p in params]
            flat = _flatten_dense_tensors(data)
            dist.broadcast(flat, get_rank_0_in_comm(self.comms[comm]), group=self.comms[comm])
            for d, s in zip(data, _unflatten_dense_tensors(flat, data)):
                d.copy_(s)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
