"""Weight-only quantisation of the decoder LM: round-to-nearest, GPTQ and AWQ, int4 packing, a
dequantising linear layer, and save/load (chapter 7.3.3–7.4).

The quantiser is asymmetric min/max with a zero point, one ``(scale, zero)`` pair per row and group of
``group_size`` input columns (``group_size=-1``: one group per row).  As in GPTQ's reference code the
range of a group always holds 0, so the zero point is itself a code in ``[0, 2^bits - 1]``::

    scale = (max(w) - min(w)) / (2^bits - 1)         zero = round(-min(w) / scale)
    code  = clamp(round(w / scale) + zero, 0, 2^bits - 1)        w ≈ scale · (code - zero)

- RTN rounds every weight to its nearest code: :func:`quantize_rtn`.
- GPTQ (Frantar et al., 2022) quantises one column at a time and spreads the error of each column over
  the columns not yet quantised, weighted by the inverse Hessian ``H = 2·XᵀX/n`` of the layer's
  calibration inputs, so the layer's *output* error stays small: :func:`quantize_gptq`.
  :func:`gptq_model` runs it layer by layer on a :class:`~common.models.decoder.DecoderLM`, the inputs of
  each layer coming from the already-quantised layers before it.
- AWQ (Lin et al., 2023) multiplies the input channels that see large activations by ``s`` before
  rounding (dividing the op before by ``s``, which changes nothing in full precision), searches
  ``s = mean|x|^α`` over a grid of α, then searches a clipping range per group: :func:`awq_model`.

:func:`pack_model` turns the float model and its :class:`QuantizedWeight` s into one whose linears are
:class:`QuantLinear` (codes packed two per byte); :func:`save_quantized` / :func:`load_quantized` write it
as safetensors plus a JSON quantisation config.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.calibration import block_inputs, block_linears, layer_inputs, run_block
from common.checkpoint import file_sha256
from common.progress import progress_if

BITS = (2, 3, 4, 8)
GROUP_RANGES = ("reference", "updated")  # gptq(): where a group's scale and zero are taken
CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
FORMAT = "book-quant-v1"


def check_spec(bits: int, group_size: int, in_features: int) -> int:
    """Validate a bit width and group size for ``in_features`` columns; returns the group width."""
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {', '.join(map(str, BITS))}")
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be -1 or a positive divisor of the input width {in_features}"
        )
    return group_size


# ----------------------------------------------------------------------------- the quantiser


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point over the last dimension of ``w`` (its range widened to hold 0)."""
    maxq = 2**bits - 1
    wmin = w.amin(-1).clamp(max=0)
    wmax = w.amax(-1).clamp(min=0)
    empty = (wmin == 0) & (wmax == 0)  # an all-zero group: any scale does
    wmin, wmax = torch.where(empty, -1.0, wmin), torch.where(empty, 1.0, wmax)
    scale = (wmax - wmin) / maxq
    zero = torch.round(-wmin / scale)
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` for a broadcastable ``scale`` and ``zero``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor):
    """(rows, cols) float weight from codes and per-(row, group) scales and zeros; ``g_idx[c]`` is the
    group of column ``c``."""
    return (codes.float() - zero.float()[:, g_idx]) * scale[:, g_idx]


@dataclass
class QuantizedWeight:
    """A quantised (rows, cols) weight: ``codes`` uint8 in ``[0, 2^bits)``, ``scale`` float32 and ``zero``
    uint8 of shape (rows, groups), and ``g_idx`` (cols,) the group of each column (not contiguous after
    GPTQ's act-order)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.g_idx)


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest: each weight to the nearest code of its group."""
    rows, cols = weight.shape
    g = check_spec(bits, group_size, cols)
    w = weight.detach().float().reshape(rows, cols // g, g)  # (rows, groups, group)
    scale, zero = minmax_params(w, bits)  # (rows, groups)
    codes = to_codes(w, scale[..., None], zero[..., None], bits).reshape(rows, cols)
    g_idx = torch.arange(cols, device=weight.device) // g
    return QuantizedWeight(codes.to(torch.uint8), scale, zero.to(torch.uint8), g_idx, bits, group_size)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """The round-to-nearest dequantised weight (same shape and dtype as ``weight``)."""
    return rtn(weight, bits, group_size).dequantize().to(weight.dtype)


# ----------------------------------------------------------------------------- GPTQ


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    group_range: str = "reference",
) -> QuantizedWeight:
    """GPTQ of one (rows, cols) weight given the (cols, cols) Hessian ``2·XᵀX/n`` of its inputs.

    Column ``i`` is rounded, and its error, divided by ``[H⁻¹]_ii``, is subtracted from the columns after
    it in proportion to row ``i`` of the upper Cholesky factor of ``H⁻¹`` (the OBS update, done for all
    rows at once).  Updates inside a block of ``block_size`` columns are applied at once; the rest of the
    matrix receives them when the block is done ("lazy batch updates").  ``act_order`` quantises columns in
    order of decreasing ``H_ii`` (the inputs with the most energy first); ``damp`` adds
    ``damp · mean(diag H)`` to the diagonal so ``H`` can be inverted.

    ``group_range``: where a group's scale and zero come from when its first column is reached.
    ``"reference"`` (the default) as the reference code (IST-DASLab ``gptq.py`` ``fasterquant``, and
    AutoGPTQ and GPTQModel after it): from ``W[:, c:c+g]``, the weights after the earlier blocks'
    updates but before the updates of the columns already done in this block.  ``"updated"``: from the
    weights with every update so far.  The two agree when groups start on block boundaries (group 128,
    per channel); below 128 they differ, and on the trained LM ``"updated"`` measured better
    (``s7_4_1_gptq`` prints both).
    """
    rows, cols = weight.shape
    g = check_spec(bits, group_size, cols)
    if group_range not in GROUP_RANGES:
        raise ValueError(f"group_range must be one of {', '.join(GROUP_RANGES)}, got {group_range!r}")
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be ({cols}, {cols}) for a weight of {cols} columns, got {tuple(hessian.shape)}"
        )
    if damp <= 0:
        raise ValueError(f"damp must be positive, got {damp}")
    W = weight.detach().float().clone()
    # one group per row: the reference takes its range from the weight as given, dead inputs included
    whole_row = minmax_params(W, bits) if g == cols and group_range == "reference" else None
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros_like(W)
    n_groups = cols // g
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # this block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % g == 0:  # a new group: its range (see group_range above)
                if whole_row is not None:
                    scale, zero = whole_row
                elif group_range == "reference":
                    scale, zero = minmax_params(W[:, c : c + g], bits)
                else:
                    scale, zero = minmax_params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g], bits)
                scales[:, c // g], zeros[:, c // g] = scale, zero
            w = W1[:, i]
            q = to_codes(w, scale, zero, bits)
            codes[:, c] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the block's updates reach the later columns at once

    out_codes = torch.empty_like(codes)
    out_codes[:, perm] = codes  # back to the original column order
    g_idx = torch.empty(cols, dtype=torch.long, device=W.device)
    g_idx[perm] = torch.arange(cols, device=W.device) // g
    return QuantizedWeight(out_codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, bits, group_size)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    group_range: str = "reference",
) -> torch.Tensor:
    """The GPTQ dequantised weight (same shape and dtype as ``weight``); see :func:`gptq`."""
    qw = gptq(weight, hessian, bits, group_size, act_order, damp, group_range=group_range)
    return qw.dequantize().to(weight.dtype)


class Hessian:
    """Running ``H = 2·XᵀX/n`` over the rows of every (…, in_features) input it is shown."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in_features)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = math.sqrt(2 / self.n) * x
        self.H += x.T @ x


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int = 4, group_size: int = 128):
    """``(fake-quantised copy, {name: QuantizedWeight})``: every block linear rounded to nearest."""
    model = copy.deepcopy(model)
    qweights = {}
    for i, block in enumerate(model.blocks):
        for name, lin in block_linears(block):
            qw = rtn(lin.weight, bits, group_size)
            lin.weight.copy_(qw.dequantize())
            qweights[f"blocks.{i}.{name}"] = qw
    return model, qweights


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    windows: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    progress: bool = False,
    group_range: str = "reference",
):
    """GPTQ of every block linear of a DecoderLM, layer by layer ("true sequential"): a layer's Hessian
    comes from running the block on the outputs of the already-quantised blocks before it, with the
    block's earlier linears already quantised.  Returns ``(fake-quantised copy, {name: QuantizedWeight})``.
    """
    model = copy.deepcopy(model).eval()
    inputs = block_inputs(model, windows)
    qweights = {}
    for i, block in enumerate(progress_if(model.blocks, "GPTQ blocks", progress)):
        for name, lin in block_linears(block):
            hess = Hessian(lin.in_features, lin.weight.device)
            hess.add(layer_inputs(block, inputs, [name])[name])
            qw = gptq(lin.weight, hess.H, bits, group_size, act_order, damp, group_range=group_range)
            lin.weight.copy_(qw.dequantize())
            qweights[f"blocks.{i}.{name}"] = qw
        inputs = run_block(block, inputs)  # the next block sees this block quantised
    return model, qweights


# ----------------------------------------------------------------------------- AWQ


@dataclass
class _ScaleGroup:
    """Linears that read one input, the op before them whose output can absorb ``1/s``, and the module
    whose output the scale search compares."""

    prev: str  # "norm1", "norm2", "v" (the value rows of qkv), "up" (the up rows of gate_up)
    linears: list[str]
    inspect: str


def _scale_groups(block) -> list[_ScaleGroup]:
    from common.models.feedforward import SwiGLU

    attn = block.attn
    groups = [_ScaleGroup("norm1", ["attn.qkv"], "attn")]
    if attn.n_kv_head == attn.n_head:  # the value heads line up with proj's input columns
        groups.append(_ScaleGroup("v", ["attn.proj"], "attn.proj"))
    if isinstance(block.ffn, SwiGLU):
        groups.append(_ScaleGroup("norm2", ["ffn.gate_up"], "ffn"))
        groups.append(_ScaleGroup("up", ["ffn.down"], "ffn.down"))
    else:  # GELU / ReLU² MLP: only its input projection follows a linear op
        groups.append(_ScaleGroup("norm2", ["ffn.fc"], "ffn"))
    return groups


def _divide_prev(block, prev: str, s: torch.Tensor) -> None:
    """Divide the output channels of the op before a scale group by ``s`` (exact in full precision)."""
    if prev in ("norm1", "norm2"):
        norm = getattr(block, prev)
        if getattr(norm, "weight", None) is None:
            raise ValueError("AWQ folds its scales into the norm weights; this model's norms have none")
        norm.weight.div_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s)
    elif prev == "v":
        attn = block.attn
        start = (attn.n_head + attn.n_kv_head) * attn.head_dim  # qkv rows: [q | k | v]
        attn.qkv.weight[start:].div_(s[:, None])
        if attn.qkv.bias is not None:
            attn.qkv.bias[start:].div_(s)
    elif prev == "up":
        d_ff = block.ffn.d_ff  # gate_up rows: [gate | up]
        block.ffn.gate_up.weight[d_ff:].div_(s[:, None])
        if block.ffn.gate_up.bias is not None:
            block.ffn.gate_up.bias[d_ff:].div_(s)
    else:
        raise ValueError(f"unknown scale source {prev!r}")


def apply_scales(block, group: _ScaleGroup, s: torch.Tensor) -> None:
    """Fold per-input-channel scales ``s`` into a block: the op before divided, the linears multiplied."""
    _divide_prev(block, group.prev, s)
    for name in group.linears:
        block.get_submodule(name).weight.mul_(s[None, :])


def _inspector(block, group: _ScaleGroup, inputs, feats):
    """A function giving the output of the module the scale search watches, on its calibration inputs."""
    if group.inspect == "attn":  # attention reads norm1's output and the block's RoPE
        attn_in = [(block.norm1(x), args) for x, args, _ in inputs]
        return lambda: torch.cat([block.attn(h, *args) for h, args in attn_in]).float()
    module = block.get_submodule(group.inspect)
    xs = feats[group.linears[0]].split(4096)
    return lambda: torch.cat([module(x) for x in xs]).float()


@torch.no_grad()
def _search_scale(block, group, x, inspect_call, bits, group_size, n_grid):
    """Best ``s = mean|x|^α`` (α on a grid in [0, 1)) for one scale group, by the inspected module's output
    error after rounding the scaled weights."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)  # (in_features,)
    linears = [block.get_submodule(n) for n in group.linears]
    originals = [lin.weight.clone() for lin in linears]
    reference = inspect_call()
    best = (math.inf, None, None)
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        for lin, w in zip(linears, originals):
            lin.weight.copy_(quantize_rtn(w * s, bits, group_size) / s)
        err = (inspect_call() - reference).float().pow(2).mean().item()
        if err < best[0]:
            best = (err, alpha, s)
    for lin, w in zip(linears, originals):
        lin.weight.copy_(w)
    return best[2], best[1]


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
) -> torch.Tensor:
    """AWQ's clipping search: per (row, group) the ``max|w|`` shrink in ``1 - k/n_grid`` (k < max_shrink ·
    n_grid) that best keeps that group's share of the output on (a sample of) the inputs ``x``.
    Returns the (rows, groups) clip values."""
    rows, cols = weight.shape
    g = check_spec(bits, group_size, cols)
    x = x.reshape(-1, cols).float()
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens]  # (tokens, cols)
    xg = x.reshape(-1, cols // g, g)  # (tokens, groups, group)
    w = weight.float().reshape(rows, cols // g, g)  # (rows, groups, group)
    reference = torch.einsum("tgk,rgk->rgt", xg, w)  # each group's contribution to each output
    full = w.abs().amax(-1)  # (rows, groups)
    best_err = torch.full_like(full, math.inf)
    best = full.clone()
    for k in range(int(max_shrink * n_grid)):
        m = full * (1 - k / n_grid)
        clipped = torch.maximum(torch.minimum(w, m[..., None]), -m[..., None])
        scale, zero = minmax_params(clipped, bits)
        q = scale[..., None] * (to_codes(clipped, scale[..., None], zero[..., None], bits) - zero[..., None])
        err = (torch.einsum("tgk,rgk->rgt", xg, q) - reference).pow(2).mean(-1)  # (rows, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, m, best)
    return best


def _clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> None:
    rows, cols = weight.shape
    g = cols if group_size == -1 else group_size
    w = weight.view(rows, cols // g, g)
    w.copy_(torch.maximum(torch.minimum(w, max_val[..., None]), -max_val[..., None]))


@torch.no_grad()
def awq_model(
    model: nn.Module,
    windows: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    n_grid: int = 20,
    clip: bool = True,
    progress: bool = False,
):
    """AWQ of every block linear of a DecoderLM, block by block.

    Per block: the inputs of every linear are collected; for each scale group (norm1→qkv, v→proj,
    norm2→gate_up, up→down) the per-input-channel scale ``s = mean|x|^α`` is searched and folded in;
    then each linear's clipping range is searched on its (scaled) inputs and applied (not for the query
    and key rows, whose error reaches the output only through the softmax); the next block's inputs are
    this block's full-precision outputs.  Finally every linear is rounded to nearest.  Returns
    ``(fake-quantised copy, {name: QuantizedWeight}, {"alphas": [...]})``; the copy's norms hold the folded
    scales, so it is the model the quantised weights belong to.
    """
    model = copy.deepcopy(model).eval()
    inputs = block_inputs(model, windows)
    alphas = []
    for block in progress_if(model.blocks, "AWQ blocks", progress):
        linears = dict(block_linears(block))
        feats = layer_inputs(block, inputs, list(linears))
        for group in _scale_groups(block):
            s, alpha = _search_scale(
                block,
                group,
                feats[group.linears[0]],
                _inspector(block, group, inputs, feats),
                bits,
                group_size,
                n_grid,
            )
            apply_scales(block, group, s)
            alphas.append(alpha)
        next_inputs = run_block(block, inputs)
        if clip:
            feats = layer_inputs(block, inputs, list(linears))  # the inputs as scaled
            for name, lin in linears.items():
                max_val = search_clip(lin.weight, feats[name], bits, group_size, n_grid)
                if name == "attn.qkv":  # leave the query and key rows unclipped
                    qk_rows = (block.attn.n_head + block.attn.n_kv_head) * block.attn.head_dim
                    max_val[:qk_rows] = math.inf
                _clip(lin.weight, max_val, group_size)
        inputs = next_inputs
    model, qweights = rtn_model(model, bits, group_size)
    return model, qweights, {"alphas": alphas}


# ----------------------------------------------------------------------------- packing and QuantLinear


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) uint8 codes -> (rows, ceil(cols/2)) bytes, two codes a byte (low nibble first) for
    ``bits <= 4``; one a byte for 8 bits."""
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if codes.numel() and int(codes.max()) >= 16:
        raise ValueError(f"codes must be below 16 to pack two per byte, got {int(codes.max())}")
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows, cols) uint8 codes."""
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :cols]


class QuantLinear(nn.Module):
    """A linear layer holding its weight as packed integer codes plus per-group scales and zeros.

    ``forward`` dequantises the whole weight and calls ``F.linear``: the plain path, exactly the float
    layer with the dequantised weight.  It reads a quarter of the bytes of an fp32 weight (int4) but does
    the unpacking work on every call.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        g = check_spec(bits, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        packed_cols = in_features if bits == 8 else (in_features + 1) // 2
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // g))
        self.register_buffer("zeros", torch.zeros(out_features, in_features // g, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.arange(in_features) // g)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        rows, cols = qw.codes.shape
        layer = cls(cols, rows, qw.bits, qw.group_size, bias=bias is not None)
        layer.qweight.copy_(pack_codes(qw.codes, qw.bits))
        layer.scales.copy_(qw.scale)
        layer.zeros.copy_(qw.zero)
        layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(qw.scale.device)

    def weight_codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.in_features, self.bits)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_codes(), self.scales, self.zeros, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
        )


def pack_model(model: nn.Module, qweights: dict[str, QuantizedWeight]) -> nn.Module:
    """A copy of ``model`` whose named linears are :class:`QuantLinear` s built from ``qweights``."""
    model = copy.deepcopy(model)
    for name, qw in qweights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear) or lin.weight.shape != qw.codes.shape:
            raise ValueError(f"{name} is not a linear of shape {tuple(qw.codes.shape)} in this model")
        setattr(parent, child, QuantLinear.from_quantized(qw, lin.bias))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed codes count at their packed size)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- save and load


def save_quantized(model: nn.Module, folder: str | os.PathLike, quantization: dict) -> Path:
    """Write a packed DecoderLM as ``model.safetensors`` plus ``quant_config.json`` (the model config, the
    quantisation settings, which layers are quantised, a pruned model's per-layer shapes, and the
    weights' SHA-256).  Each file goes to a temporary name and is renamed; the config, written last,
    marks the folder complete."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {"bits": m.bits, "group_size": m.group_size, "bias": m.bias is not None}
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }
    config = {
        "format": FORMAT,
        "model_config": model.config.to_dict(),
        "quantization": quantization,
        "layers": layers,
    }
    if hasattr(model, "shape_summary"):  # a structurally pruned model: its per-layer heads and widths
        config["layer_shapes"] = model.shape_summary()
    (folder / CONFIG).unlink(missing_ok=True)  # an old config must not vouch for new weights
    tmp = folder / f"{WEIGHTS}.tmp{os.getpid()}"
    save_model(model, str(tmp))
    config["weights_sha256"] = file_sha256(tmp)  # load checks it before it trusts a byte
    os.replace(tmp, folder / WEIGHTS)
    tmp = folder / f"{CONFIG}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder / CONFIG)
    return folder


def _check_layer(name: str, spec, layer: QuantLinear) -> None:
    """ValueError unless the loaded ``layer`` holds what its ``spec`` says: codes and zero points within
    the bit width, one scale per group of the group size."""
    top = max(int(layer.weight_codes().max()), int(layer.zeros.max()))
    if top >= 2 ** spec["bits"]:
        raise ValueError(f"{name} says {spec['bits']} bits, its codes reach {top}")
    if int(layer.g_idx.min()) < 0 or int(layer.g_idx.max()) >= layer.scales.shape[1]:
        raise ValueError(f"{name}: its column groups do not match its {layer.scales.shape[1]} scales")


def load_quantized(folder: str | os.PathLike, device: str = "cpu"):
    """``(model, config)`` from :func:`save_quantized`'s folder (safetensors: no code runs on load).

    Checked before it is trusted, every refusal one ``ValueError``: the weights' checksum, the config's
    fields, the settings of the ``quantization`` block against every layer's, and each layer's tensors
    against its bits and group size (shapes, and codes within the bit width)."""
    from safetensors.torch import load_model

    from common.models.decoder import DecoderConfig, DecoderLM

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ValueError(f"{folder} is not a quantised model folder (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG} is not readable JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{folder / CONFIG} has format {got!r}, expected {FORMAT!r}")
    if file_sha256(folder / WEIGHTS) != config.get("weights_sha256"):
        raise ValueError(
            f"{folder / WEIGHTS} does not match the checksum in {CONFIG} (an edited, truncated or other file)"
        )
    try:
        layers, settings = dict(config["layers"]), dict(config["quantization"])
        model = DecoderLM(DecoderConfig(**config["model_config"]))
        if "layer_shapes" in config:
            from common.prune import pruned_like

            model = pruned_like(model, config["layer_shapes"])
        for name, spec in layers.items():
            for key in ("bits", "group_size"):
                if key in settings and spec[key] != settings[key]:
                    raise ValueError(f"{name} has {key} {spec[key]}, the quantization block {settings[key]}")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, child)
            shape = (lin.in_features, lin.out_features, spec["bits"], spec["group_size"], spec["bias"])
            setattr(parent, child, QuantLinear(*shape))
        load_model(model, str(folder / WEIGHTS), strict=True, device="cpu")
        for name, spec in layers.items():
            _check_layer(name, spec, model.get_submodule(name))
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{folder}: the quantised model does not match its {CONFIG}: {e}") from None
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------- one entry point

METHODS = ("rtn", "gptq", "awq")


def check_model_spec(model: nn.Module, bits: int, group_size: int) -> None:
    """ValueError (one line) unless every block linear of ``model`` can take ``bits`` and ``group_size``."""
    for i, block in enumerate(model.blocks):
        for name, lin in block_linears(block):
            try:
                check_spec(bits, group_size, lin.in_features)
            except ValueError as e:
                raise ValueError(f"blocks.{i}.{name}: {e}") from None


def quantize_model(
    model: nn.Module,
    method: str,
    bits: int = 4,
    group_size: int = 128,
    windows: torch.Tensor | None = None,
    progress: bool = False,
    **options,
):
    """``(fake-quantised copy, {name: QuantizedWeight}, seconds)`` by ``method`` ("rtn", "gptq", "awq");
    GPTQ and AWQ need calibration ``windows``; ``options`` go to :func:`gptq_model` / :func:`awq_model`."""
    import time

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_model_spec(model, bits, group_size)
    if method != "rtn" and windows is None:
        raise ValueError(f"{method} needs calibration windows")
    start = time.perf_counter()
    if method == "rtn":
        fake, qweights = rtn_model(model, bits, group_size)
    elif method == "gptq":
        fake, qweights = gptq_model(model, windows, bits, group_size, progress=progress, **options)
    else:
        fake, qweights, _ = awq_model(model, windows, bits, group_size, progress=progress, **options)
    return fake, qweights, time.perf_counter() - start
