"""fastmoe's public API (laekov/fastmoe at commit ee3c561) in pure PyTorch: no CUDA, no NCCL, one
worker or several (gloo on a CPU, NCCL on GPUs, through ``torch.distributed``).

* :mod:`~common.fmoe.layers`           FMoE: gate, rows to the experts, experts, weighted combine;
                                        tensor or dict/list inputs, slice groups, masks
* :mod:`~common.fmoe.transformer`      FMoETransformerMLP: the MoE feed-forward of a Transformer block
* :mod:`~common.fmoe.linear`           FMoELinear / MOELinear: several experts' linear layers in one weight
* :mod:`~common.fmoe.gates`            ZeroGate, NaiveGate, NoisyGate, GShardGate, SwitchGate, DCGate
* :mod:`~common.fmoe.functions`        count_by_gate, prepare_forward, MOEScatter/MOEGather, AllGather/Slice
* :mod:`~common.fmoe.expert_parallel`  the all-to-all that carries rows to the workers owning their experts
* :mod:`~common.fmoe.distributed`      DistributedGroupedDataParallel: gradients synced per ``dp_comm`` tag
* :mod:`~common.fmoe.utils`, :mod:`~common.fmoe.balance`, :mod:`~common.fmoe.megatron` (its initialisers)
* :mod:`~common.fmoe.backend`          fmoe_backend(): the real ``fmoe`` where it imports, else this package

Parameter names and shapes are fastmoe's, so its state dicts load here with ``strict=True``.
fastmoe's own tests (``tests/fastmoe/``) run against this package.  Not provided: ``SwipeGate``,
``FasterGate`` and ``fmoe.fastermoe`` (CUDA kernels), Megatron-LM's wrappers (``fmoe.megatron``).
"""

from common.fmoe.distributed import DistributedGroupedDataParallel
from common.fmoe.gates import BaseGate, DCGate, GShardGate, NaiveGate, NoisyGate, SwitchGate, ZeroGate
from common.fmoe.layers import FMoE, mark_module_parallel_comm
from common.fmoe.linear import FMoELinear
from common.fmoe.transformer import FMoETransformerMLP

__version__ = "common.fmoe"

__all__ = [
    "BaseGate",
    "DCGate",
    "DistributedGroupedDataParallel",
    "FMoE",
    "FMoELinear",
    "FMoETransformerMLP",
    "GShardGate",
    "NaiveGate",
    "NoisyGate",
    "SwitchGate",
    "ZeroGate",
    "mark_module_parallel_comm",
]
