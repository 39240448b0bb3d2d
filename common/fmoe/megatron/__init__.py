"""fastmoe's ``fmoe.megatron``: what of it runs without Megatron-LM.

Only :mod:`common.fmoe.megatron.layers`' weight initialisers (``_megatron_init_method``,
``_random_init_weight``), which fastmoe's own tests use.  ``MegatronMLP``, ``fmoefy``, the
checkpoint, patch, balance-hook and ``DistributedDataParallel`` wrappers read Megatron-LM's global
arguments and its ``mpu`` groups at every call, so they are not provided: with Megatron-LM
installed, use the real fastmoe.
"""
