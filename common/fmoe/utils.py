"""fastmoe's ``fmoe.utils``: the default process group and the global rank of a group's first member.

fastmoe digs torch's NCCL communicator out of the default group for its CUDA kernels; here the
collectives are torch's own (gloo on a CPU, NCCL on GPUs), so the group object itself is what
every function takes.
"""

from __future__ import annotations

import torch.distributed as dist


def get_torch_default_comm():
    """The default (world) process group; raises if ``torch.distributed`` is not initialised."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    return dist.group.WORLD


def get_rank_0_in_comm(comm) -> int:
    """The global rank of the process that is rank 0 in ``comm`` (the root of a broadcast over it)."""
    return dist.get_global_rank(comm, 0)
