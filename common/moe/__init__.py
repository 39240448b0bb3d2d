"""Mixture-of-Experts (book section 4.2): routers, one fast dispatch, layers, losses, load statistics.

One concept per module:

* :mod:`~common.moe.routing`     what a router returns, capacity, positions in an expert's queue
* :mod:`~common.moe.experts`     a bank of experts with stacked weights
* :mod:`~common.moe.dispatch`    the fast sort-by-expert dispatch and the dense loop it must equal
* :mod:`~common.moe.topk_router`, :mod:`~common.moe.switch_router`, :mod:`~common.moe.gshard_router`,
  :mod:`~common.moe.deepseek_router`   one router each, with the convention it follows
* :mod:`~common.moe.losses`      balance loss, z-loss, sequence-wise balance loss
* :mod:`~common.moe.stats`       expert load statistics
* :mod:`~common.moe.layers`      the MoE layers (with ``from_hf``)
"""

from common.moe.deepseek_router import DeepSeekRouter
from common.moe.dispatch import dense_loop, dispatch
from common.moe.experts import Experts, SwiGLU
from common.moe.gshard_router import GShardRouter
from common.moe.layers import DeepSeekMoE, GShardMoE, MoELayer, SwitchMoE, TopKMoE
from common.moe.losses import balance_loss, sequence_balance_loss, z_loss
from common.moe.routing import Routing, expert_capacity, positions_in_expert
from common.moe.stats import ExpertLoad, merge_loads
from common.moe.switch_router import SwitchRouter
from common.moe.topk_router import TopKRouter

__all__ = [
    "DeepSeekMoE",
    "DeepSeekRouter",
    "ExpertLoad",
    "Experts",
    "GShardMoE",
    "GShardRouter",
    "MoELayer",
    "Routing",
    "SwiGLU",
    "SwitchMoE",
    "SwitchRouter",
    "TopKMoE",
    "TopKRouter",
    "balance_loss",
    "dense_loop",
    "dispatch",
    "expert_capacity",
    "merge_loads",
    "positions_in_expert",
    "sequence_balance_loss",
    "z_loss",
]
