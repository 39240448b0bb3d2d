"""fastmoe's gates (``fmoe.gates``) in plain PyTorch: which experts each token goes to, with what score.

A gate maps flat tokens ``(tokens, d_model)`` to ``(gate_top_k_idx, gate_score)``: the chosen
*global* expert ids ``(tokens, top_k)`` (an id is ``worker · num_expert + local expert``; ``-1``
marks a slot that a capacity limit or random routing dropped, which then outputs zero) and their
scores ``(tokens, top_k)``.  Its auxiliary loss waits in ``gate.get_loss()`` (cleared when read).

* :class:`ZeroGate` -- every slot to expert 0, score ``1/top_k`` (for tests);
* :class:`NaiveGate` -- ``nn.Linear(d_model, tot_expert)``, top-k of the logits (``sorted=False``,
  as fastmoe), softmax over those k; its loss is a zero tensor with a gradient;
* :class:`NoisyGate` -- Shazeer et al.'s noisy top-k, loss ``cv²(importance) + cv²(load)``;
* :class:`GShardGate` -- NaiveGate top-2, GShard's balance loss, ``ceil(cap · S) · 2 // (W · E)``
  slots per global expert on each worker, random routing of the second slot;
* :class:`SwitchGate` -- top-1 of a softmax over noisy logits, ``ceil(cap · S / E)`` slots per
  expert counted over all workers' tokens (:func:`~common.fmoe.gates.utils.limit_by_capacity`);
* :class:`DCGate` -- GShardGate's loss and routing with ``ceil(cap · S)`` slots per expert counted
  over all workers.

``capacity=(train, eval)`` rates, as fastmoe.  fastmoe's ``SwipeGate`` (a CUDA/NCCL kernel) and
``FasterGate`` (FasterMoE's topology-aware gate, needs its CUDA schedule) are not provided.
"""

from common.fmoe.gates.base_gate import BaseGate
from common.fmoe.gates.dc_gate import DCGate
from common.fmoe.gates.gshard_gate import GShardGate
from common.fmoe.gates.naive_gate import NaiveGate
from common.fmoe.gates.noisy_gate import NoisyGate
from common.fmoe.gates.switch_gate import SwitchGate
from common.fmoe.gates.zero_gate import ZeroGate

__all__ = ["BaseGate", "DCGate", "GShardGate", "NaiveGate", "NoisyGate", "SwitchGate", "ZeroGate"]
