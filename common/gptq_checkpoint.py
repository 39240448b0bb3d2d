"""Read a GPTQ checkpoint as AutoGPTQ and GPTQModel write it, into this repository's quantised weights.

The ``gptq`` checkpoint format (``quantize_config.json`` with ``"checkpoint_format": "gptq"``, 4 bits,
``pack_dtype`` int32) stores, per linear ``<name>``:

* ``qweight`` (K/8, N) int32: code of input column ``8·r + i`` and output row ``n`` in bits ``4i..4i+3``
  of ``qweight[r, n]``;
* ``qzeros`` (groups, N/8) int32: the zero point of group ``g`` and row ``8·c + i`` in bits
  ``4i..4i+3`` of ``qzeros[g, c]``, stored minus one (the format's historic offset; ``gptq_v2``
  stores it as is);
* ``scales`` (groups, N) fp16 and ``g_idx`` (K,) the group of every input column.

:func:`read_gptq_checkpoint` turns each into a :class:`common.quant.QuantizedWeight`
(``w = scale · (code - zero)``), and :func:`as_decoder_weights` stacks Llama's ``q/k/v_proj`` and
``gate/up_proj`` as the DecoderLM's fused ``attn.qkv`` and ``ffn.gate_up`` (GPTQ rounds every row on
its own, so stacking rows quantised with the same inputs is exact).  Loading through safetensors: no
code runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.quant import QuantizedWeight

FORMATS = {"gptq": 1, "gptq_v2": 0}  # the zero-point offset each checkpoint format stores


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
