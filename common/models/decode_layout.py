"""Column-major copies of a model's weight matrices for decoding, held apart from the model (opt-in).

A decoding step multiplies one row of activations per sequence by every weight matrix. ``nn.Linear``
stores its weight row-major as (out, in) and computes ``x @ W.T``; for one row that is a matrix-vector
product with a transposed operand, and on this CPU torch's BLAS streams it at well under half the memory
bandwidth (:func:`common.machine.matvec_bandwidth` measures it). The same product over W's transpose
stored contiguously, (in, out) in memory, streams it markedly faster. ``benchmarks.bench_decoder`` and
``benchmarks.bench_moe`` measure both.

    fast = DecodeLayout(model)            # copies every matrix: fast.extra_bytes more memory
    generate(fast, prompts, 100)          # the same tokens as generate(model, prompts, 100), sooner
    logits, _ = fast(idx)                 # any forward of the model, with the copies in place

The model is never touched: its parameters keep their values, storage and layout. Each call runs the
model's own forward through ``torch.func.functional_call`` with the copies standing in for its
matrices, so the copies are a snapshot (build a new ``DecodeLayout`` after training). Every other
attribute (``config``, ``new_kv_cache``, ``eval``...) is the model's own. Embedding tables keep their
row-major layout: a lookup reads rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with its last two dimensions stored transposed: the same shape and values,
    strides such that ``weight.transpose(-1, -2)`` is contiguous."""
    return weight.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


class DecodeLayout:
    """``model`` with column-major copies of its matrices (every parameter of two or more dimensions
    outside embedding tables: linear weights, stacked expert weights)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.weights = {
            f"{prefix}.{name}" if prefix else name: column_major(p)
            for prefix, module in model.named_modules()
            if not isinstance(module, nn.Embedding)
            for name, p in module.named_parameters(recurse=False)
            if p.dim() >= 2
        }
        self.extra_bytes = sum(w.nbytes for w in self.weights.values())

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.weights, args, kwargs, tie_weights=False, strict=False)

    def __getattr__(self, name: str):
        return getattr(self.model, name)
