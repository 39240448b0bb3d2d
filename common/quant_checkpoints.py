"""Read 4-bit GPTQ and AWQ checkpoints, as AutoGPTQ, AutoAWQ and GPTQModel write them, into this
repository's quantised weights (``w = scale · (code - zero)``, :class:`common.quant.QuantizedWeight`).

The ``gptq`` format (``quantize_config.json`` with ``"checkpoint_format": "gptq"``, 4 bits, ``pack_dtype``
int32) stores, per linear ``<name>``:

* ``qweight`` (K/8, N) int32: code of input column ``8·r + i`` and output row ``n`` in bits ``4i..4i+3``
  of ``qweight[r, n]``;
* ``qzeros`` (groups, N/8) int32: the zero point of group ``g`` and row ``8·c + i`` in bits
  ``4i..4i+3`` of ``qzeros[g, c]``, stored minus one (the format's historic offset; ``gptq_v2``
  stores it as is);
* ``scales`` (groups, N) fp16 and ``g_idx`` (K,) the group of every input column.

The AWQ ``gemm`` format (``"checkpoint_format": "gemm"``, ``"zero_point": true``) packs along the output
rows instead, in AWQ's interleaved order:

* ``qweight`` (K, N/8) int32: field ``i`` (bits ``4i..4i+3``) of ``qweight[k, c]`` holds the code of input
  column ``k`` and output row ``8·c + AWQ_ORDER[i]``;
* ``qzeros`` (groups, N/8) int32, packed the same way, zero points as they are;
* ``scales`` (groups, N); no ``g_idx``: group ``k // group_size``.

AWQ also rescales the norms in front of the linears (``input_layernorm``, ``post_attention_layernorm``),
so :func:`read_awq_checkpoint` returns the checkpoint's other tensors as well.  :func:`as_decoder_weights`
stacks Llama's ``q/k/v_proj`` and ``gate/up_proj`` as the DecoderLM's fused ``attn.qkv`` and
``ffn.gate_up`` (both methods round every row on its own with the same inputs, so stacking is exact).
Loading through safetensors: no code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.quant import QuantizedWeight

FORMATS = {"gptq": 1, "gptq_v2": 0}  # the zero-point offset each checkpoint format stores
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output row of each 4-bit field, within a run of 8


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit fields per int32, lowest bits first, spread along ``dim`` (0: rows, 1: columns)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    fields = (packed.unsqueeze(-1) >> shifts) & 0xF  # (..., 8)
    if dim == 0:  # (K/8, N, 8) -> (K, N)
        return fields.permute(0, 2, 1).reshape(-1, packed.shape[1]).to(torch.uint8)
    return fields.reshape(packed.shape[0], -1).to(torch.uint8)  # (G, N/8, 8) -> (G, N)


def read_gptq_checkpoint(folder: str | Path) -> tuple[dict[str, QuantizedWeight], dict]:
    """``({linear name: QuantizedWeight}, quantize_config)`` of a 4-bit GPTQ checkpoint folder."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "quantize_config.json").read_text())
    fmt = config.get("checkpoint_format", config.get("format", "gptq"))
    if config.get("bits") != 4 or fmt not in FORMATS or config.get("pack_dtype", "int32") != "int32":
        raise ValueError(
            f"{folder}: a 4-bit int32-packed gptq or gptq_v2 checkpoint is read, got "
            f"bits={config.get('bits')}, format={fmt!r}, pack_dtype={config.get('pack_dtype')!r}"
        )
    group_size = config["group_size"]
    weights = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors file")
    for path in files:
        with safe_open(str(path), "pt") as f:
            names = [k[: -len(".qweight")] for k in f.keys() if k.endswith(".qweight")]
            for name in names:
                codes = unpack_int32(f.get_tensor(f"{name}.qweight"), dim=0).T.contiguous()  # (N, K)
                zeros = unpack_int32(f.get_tensor(f"{name}.qzeros"), dim=1).T + FORMATS[fmt]  # (N, G)
                scale = f.get_tensor(f"{name}.scales").float().T.contiguous()  # (N, G)
                g_idx = f.get_tensor(f"{name}.g_idx").long()
                weights[name] = QuantizedWeight(
                    codes, scale, zeros.to(torch.uint8).contiguous(), g_idx, 4, group_size
                )
    return weights, config


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """(rows, N/8) int32 in AWQ's interleaved order -> (rows, N) codes in row order."""
    fields = unpack_int32(packed, dim=1).view(packed.shape[0], -1, 8)  # (rows, N/8, 8): field order
    rows = torch.empty_like(fields)
    rows[..., list(AWQ_ORDER)] = fields  # field i holds output row AWQ_ORDER[i] of its run of 8
    return rows.reshape(packed.shape[0], -1)


def read_awq_checkpoint(
    folder: str | Path,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """``({linear name: QuantizedWeight}, {other tensor name: tensor}, quantize_config)`` of a 4-bit AWQ
    ``gemm`` checkpoint with zero points; the other tensors hold the norms AWQ rescaled."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "quantize_config.json").read_text())
    fmt = config.get("checkpoint_format", config.get("version", config.get("format")))
    if config.get("bits", config.get("w_bit")) != 4 or fmt != "gemm" or not config.get("zero_point", True):
        raise ValueError(
            f"{folder}: a 4-bit AWQ gemm checkpoint with zero points is read, got bits={config.get('bits')}, "
            f"format={fmt!r}, zero_point={config.get('zero_point')!r}"
        )
    group_size = config.get("group_size", config.get("q_group_size"))
    weights, others = {}, {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors file")
    for path in files:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            names = {k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}
            for name in names:
                codes = _unpack_awq(f.get_tensor(f"{name}.qweight")).T.contiguous()  # (N, K)
                zeros = _unpack_awq(f.get_tensor(f"{name}.qzeros")).T.contiguous()  # (N, G)
                scale = f.get_tensor(f"{name}.scales").float().T.contiguous()  # (N, G)
                g_idx = torch.arange(codes.shape[1]) // group_size
                weights[name] = QuantizedWeight(codes, scale, zeros.to(torch.uint8), g_idx, 4, group_size)
            packed = {f"{n}.{part}" for n in names for part in ("qweight", "qzeros", "scales")}
            others |= {k: f.get_tensor(k) for k in keys - packed}
    return weights, others, config


def as_decoder_norms(tensors: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Llama's block norm weights -> the DecoderLM's (``blocks.{i}.norm1.weight``, ``...norm2.weight``)."""
    out = {}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.norm1.weight"] = tensors[p + "input_layernorm.weight"]
        out[f"blocks.{i}.norm2.weight"] = tensors[p + "post_attention_layernorm.weight"]
    return out


def _stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    if any(not torch.equal(p.g_idx, parts[0].g_idx) for p in parts):
        raise ValueError("stacked projections must share their column groups (g_idx)")
    return QuantizedWeight(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.zero for p in parts]),
        parts[0].g_idx,
        parts[0].bits,
        parts[0].group_size,
    )


def as_decoder_weights(weights: dict[str, QuantizedWeight], n_layer: int) -> dict[str, QuantizedWeight]:
    """Llama's per-projection names -> the DecoderLM's block linears (``blocks.{i}.attn.qkv`` …)."""
    out = {}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.attn.qkv"] = _stack([weights[p + f"self_attn.{n}_proj"] for n in "qkv"])
        out[f"blocks.{i}.attn.proj"] = weights[p + "self_attn.o_proj"]
        out[f"blocks.{i}.ffn.gate_up"] = _stack([weights[p + "mlp.gate_proj"], weights[p + "mlp.up_proj"]])
        out[f"blocks.{i}.ffn.down"] = weights[p + "mlp.down_proj"]
    return out
