"""The fast path for quantised models (opt-in, beside the plain one): int4 and int8 weight-only matmuls
on torch's own kernels, as gpt-fast's ``WeightOnlyInt4Linear`` / ``WeightOnlyInt8Linear`` use them.

:class:`~common.quant.QuantLinear` is the path a reader opens: it dequantises its whole weight and calls
``F.linear``, which on a CPU costs more than the 4x fewer bytes save.  :func:`to_runtime` returns a copy
of a model whose QuantLinears run instead on

* :class:`Int4Linear` -- ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a CPU,
  ``_weight_int4pack_mm`` on CUDA: the 4-bit codes stay packed, dequantised inside the kernel's tiles;
* :class:`Int8Linear` -- ``torch._weight_int8pack_mm`` for 8 bits with one scale per row, on a CPU
  (on other devices the layer stays plain: no GPU has been lent to check torch's kernel there).

Our codes mean ``w = scale · (code - zero)``.  torch's int4 kernel reads ``w = (q - 8) · s + z`` with
``scales_and_zeros`` of shape (K/G, N, 2): so ``s = scale``, ``z = scale · (8 - zero)``, ``q = code``.
Its int8 kernel is symmetric, ``w = q · s``: with ``q = code - 128``,
``x · wᵀ = s ⊙ (x · qᵀ) - (Σ_k x_k) · s · (zero - 128)``, the second term one outer product.  GPTQ's
act-order leaves groups that are not contiguous; the columns are then permuted once at conversion
(the codes) and the input's columns at every call, which leaves the product unchanged.

Activations run in bf16 where the device has it (:func:`activation_dtype`: CUDA with bf16, a CPU whose
oneDNN has bf16 kernels) and in fp32 elsewhere; the output returns in the input's dtype.  A layer
the kernels refuse (int4: N not a multiple of 16 on a CPU, 8 on CUDA; groups other than 32, 64,
128, 256; other bit widths; int8: more than one group per row) keeps its plain QuantLinear, and
:func:`to_runtime` says which path every layer took and why.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from common.env import cpu_bf16_native
from common.quant import QuantLinear

INT4_GROUPS = (32, 64, 128, 256)


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run natively here: ``torch.cuda.is_bf16_supported()`` on CUDA, oneDNN's
    bf16 support on a CPU (AVX-512 with bf16, AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


def activation_dtype(device: torch.device | str) -> torch.dtype:
    """The activations' dtype for the kernels: bf16 where the device has it, else fp32."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def _groups_order(layer: QuantLinear) -> torch.Tensor | None:
    """The column order that makes every group contiguous, or None if it already is."""
    g = layer.in_features if layer.group_size == -1 else layer.group_size
    if torch.equal(layer.g_idx, torch.arange(layer.in_features, device=layer.g_idx.device) // g):
        return None
    perm = torch.argsort(layer.g_idx, stable=True)
    if not torch.equal(layer.g_idx[perm], torch.arange(layer.in_features, device=perm.device) // g):
        raise ValueError("g_idx does not give every group its group_size columns")
    return perm


def int4_refusal(layer: QuantLinear, device: torch.device | str, act_dtype: torch.dtype) -> str | None:
    """Why :class:`Int4Linear` cannot take ``layer`` on ``device`` (None: it can)."""
    device = torch.device(device)
    n_multiple = 8 if device.type == "cuda" else 16
    if device.type not in ("cpu", "cuda"):
        return f"no int4 kernel on {device.type}"
    if layer.bits != 4:
        return f"{layer.bits}-bit codes (the int4 kernel takes 4)"
    if layer.group_size not in INT4_GROUPS:
        return f"group size {layer.group_size} (the int4 kernel takes {', '.join(map(str, INT4_GROUPS))})"
    if layer.out_features % n_multiple:
        return f"{layer.out_features} output features, not a multiple of {n_multiple}"
    if device.type == "cuda" and (act_dtype != torch.bfloat16 or layer.in_features % 32):
        return "CUDA's int4 kernel needs bf16 activations and input features in multiples of 32"
    return None


def int8_refusal(layer: QuantLinear, device: torch.device | str) -> str | None:
    """Why :class:`Int8Linear` cannot take ``layer`` (None: it can)."""
    if layer.bits != 8:
        return f"{layer.bits}-bit codes (the int8 kernel takes 8)"
    if layer.group_size != -1:
        return f"groups of {layer.group_size} (the int8 kernel has one scale per output row)"
    if torch.device(device).type != "cpu":
        return f"the int8 kernel runs here on a CPU only (not tried on {torch.device(device).type})"
    return None


class Int4Linear(nn.Module):
    """A 4-bit :class:`~common.quant.QuantLinear` on torch's int4 kernel; same outputs (fp32
    activations: to rounding; bf16: to bf16's)."""

    def __init__(self, layer: QuantLinear, act_dtype: torch.dtype):
        super().__init__()
        device = layer.qweight.device
        if (reason := int4_refusal(layer, device, act_dtype)) is not None:
            raise ValueError(f"Int4Linear cannot take this layer: {reason}")
        self.in_features, self.out_features, self.group_size = (
            layer.in_features,
            layer.out_features,
            layer.group_size,
        )
        self.act_dtype = act_dtype
        perm = _groups_order(layer)
        codes = layer.weight_codes()  # (N, K) uint8
        if perm is not None:
            codes = codes[:, perm]
        self.register_buffer("perm", perm)
        scale = layer.scales.float()  # (N, groups)
        offset = scale * (8 - layer.zeros.float())  # torch's z: w = (q - 8)·s + z
        sz = torch.stack([scale.T, offset.T], dim=-1).contiguous()  # (groups, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(act_dtype))
        if device.type == "cuda":
            inner_k_tiles = 8 if self.in_features % 256 == 0 else 4 if self.in_features % 128 == 0 else 2
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (N, K/2), even column high
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (rows, K)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        x2 = x2.to(self.act_dtype)
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.weight, self.group_size, self.scales_and_zeros
            )
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int4 g{self.group_size}, "
            f"activations {str(self.act_dtype).removeprefix('torch.')}"
        )


class Int8Linear(nn.Module):
    """An 8-bit per-row :class:`~common.quant.QuantLinear` on ``torch._weight_int8pack_mm``."""

    def __init__(self, layer: QuantLinear, act_dtype: torch.dtype):
        super().__init__()
        if (reason := int8_refusal(layer, layer.qweight.device)) is not None:
            raise ValueError(f"Int8Linear cannot take this layer: {reason}")
        self.in_features, self.out_features, self.act_dtype = layer.in_features, layer.out_features, act_dtype
        codes = layer.weight_codes()  # (N, K) uint8 in [0, 255], one group per row
        self.register_buffer("weight", (codes.to(torch.int16) - 128).to(torch.int8))  # (N, K) symmetric
        scale = layer.scales.float()[:, 0]  # (N,)
        self.register_buffer("scales", scale.to(act_dtype))
        self.register_buffer("offset", scale * (layer.zeros.float()[:, 0] - 128))  # (N,) fp32
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (rows, K)
        y = torch._weight_int8pack_mm(x2.to(self.act_dtype), self.weight, self.scales).float()
        y = y - x2.float().sum(-1, keepdim=True) * self.offset  # the zero points, one outer product
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int8 per row, "
            f"activations {str(self.act_dtype).removeprefix('torch.')}"
        )


def runtime_layer(layer: QuantLinear, act_dtype: torch.dtype) -> tuple[nn.Module, str]:
    """``(layer on a kernel, "int4 kernel ...")`` or ``(the same QuantLinear, "plain: <why>")``."""
    device = layer.qweight.device
    act = str(act_dtype).removeprefix("torch.")
    if layer.bits == 4:
        reason = int4_refusal(layer, device, act_dtype)
        if reason is None:
            return Int4Linear(layer, act_dtype), f"int4 kernel, {act} activations"
    else:
        reason = int8_refusal(layer, device)
        if reason is None:
            return Int8Linear(layer, act_dtype), f"int8 kernel, {act} activations"
    return layer, f"plain QuantLinear: {reason}"


def to_runtime(model: nn.Module, act_dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` whose QuantLinears run on torch's kernels where they can; ``model`` itself
    is untouched.  Returns ``(copy, {layer name: the path it took})``; ``act_dtype`` None picks
    :func:`activation_dtype` for the model's device."""
    model = copy.deepcopy(model)
    paths = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        dtype = act_dtype or activation_dtype(module.qweight.device)
        new, paths[name] = runtime_layer(module, dtype)
        if new is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model, paths


def summarize_paths(paths: dict[str, str]) -> str:
    """One line: how many layers took each path."""
    counts: dict[str, int] = {}
    for path in paths.values():
        counts[path] = counts.get(path, 0) + 1
    return "; ".join(f"{n} layer{'s' if n > 1 else ''}: {path}" for path, n in counts.items()) or "no layers"
