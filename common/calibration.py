"""Calibration on the decoder LM: windows of tokens, and the inputs each block and each linear sees.

GPTQ and AWQ (:mod:`common.quant`) and Wanda (:mod:`common.prune`) all walk a
:class:`~common.models.decoder.DecoderLM` the same way: the first block's inputs for a few windows of
training text (:func:`block_inputs`), then block by block the inputs of its linears
(:func:`layer_inputs`, in the order the block uses them: :func:`block_linears`), the block changed,
and its outputs as the next block's inputs (:func:`run_block`).
"""

from __future__ import annotations

import torch
from torch import nn


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """(n_samples, seq_len) non-overlapping windows from the start of a 1-D token stream."""
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    need = n_samples * seq_len
    if tokens.numel() < need:
        raise ValueError(
            f"calibration data has {tokens.numel():,} tokens; {n_samples} samples of {seq_len} need {need:,}"
        )
    return tokens[:need].reshape(n_samples, seq_len).clone()


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured: the rest need not run."""


@torch.no_grad()
def block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 16):
    """The first block's inputs for every batch of ``windows``: a list of (x, args, kwargs), where ``x`` is
    the (batch, seq, d_model) hidden state and ``args``/``kwargs`` the rest of the block's call (RoPE)."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(next(model.parameters()).device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The block's linear layers in the order its forward uses them (attention qkv, proj, then the FFN)."""
    return [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def run_block(block, inputs):
    """The next block's inputs: this block's hidden-state output (a Block returns ``(x, aux_loss)``)."""
    return [(block(x, *args, **kwargs)[0], args, kwargs) for x, args, kwargs in inputs]


@torch.no_grad()
def layer_inputs(block, inputs, names: list[str]) -> dict[str, torch.Tensor]:
    """Run ``block`` on ``inputs``; the (tokens, in_features) inputs each named linear saw."""
    seen: dict[str, list] = {n: [] for n in names}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    try:
        for x, args, kwargs in inputs:
            block(x, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}
