"""fastmoe's public API (laekov/fastmoe) in pure PyTorch: no CUDA, no NCCL, one worker or several.

* :mod:`~common.fmoe.gates`            NaiveGate, NoisyGate, GShardGate, SwitchGate (``get_loss()``)
* :mod:`~common.fmoe.linear`           FMoELinear: several experts' linear layers in one weight
* :mod:`~common.fmoe.layers`           FMoE: gate, sort by expert, experts, weighted combine
* :mod:`~common.fmoe.transformer`      FMoETransformerMLP: the MoE feed-forward of a Transformer block
* :mod:`~common.fmoe.expert_parallel`  the all-to-all that carries tokens to the workers owning their experts
* :mod:`~common.fmoe.distributed`      DistributedGroupedDataParallel: gradients synced per ``dp_comm`` tag
* :mod:`~common.fmoe.backend`          fmoe_backend(): the real ``fmoe`` where it imports, else this package

Parameter names and shapes are fastmoe's, so its state dicts load here with ``strict=True``.
"""

from common.fmoe.distributed import DistributedGroupedDataParallel
from common.fmoe.gates import BaseGate, GShardGate, NaiveGate, NoisyGate, SwitchGate
from common.fmoe.layers import FMoE, mark_module_parallel_comm
from common.fmoe.linear import FMoELinear
from common.fmoe.transformer import FMoETransformerMLP

__version__ = "common.fmoe"

__all__ = [
    "BaseGate",
    "DistributedGroupedDataParallel",
    "FMoE",
    "FMoELinear",
    "FMoETransformerMLP",
    "GShardGate",
    "NaiveGate",
    "NoisyGate",
    "SwitchGate",
    "mark_module_parallel_comm",
]
