"""Conversion between :class:`~common.models.decoder.DecoderLM` and transformers' ``LlamaForCausalLM``.

Llama is our decoder with rmsnorm, RoPE (``rotate_half`` layout, the one we use, so no permutation of
q/k rows is needed), SwiGLU, pre-norm. The only layout differences are our fused projections:
``attn.qkv`` = [q_proj; k_proj; v_proj] and ``ffn.gate_up`` = [gate_proj; up_proj] stacked by rows.
transformers is imported inside the functions (it is heavy).
"""

from __future__ import annotations

import torch

from common.models.decoder import DecoderConfig, DecoderLM

# DecoderConfig field -> LlamaConfig field, for the settings that carry over one to one (both ways)
_SAME_FIELDS = {
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "n_layer": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "norm_eps": "rms_norm_eps",
}


def llama_config(config: DecoderConfig):
    """The ``LlamaConfig`` of a DecoderConfig; ValueError naming every field Llama cannot express."""
    from transformers import LlamaConfig

    problems = []
    if config.norm not in ("rmsnorm", "rmsnorm_noweight"):
        problems.append(f"norm={config.norm!r} (Llama uses RMSNorm)")
    if config.norm_placement != "pre":
        problems.append("norm_placement='post' (Llama is pre-norm)")
    if config.pos != "rope":
        problems.append(f"pos={config.pos!r} (Llama uses RoPE)")
    if config.ffn != "swiglu":
        problems.append(f"ffn={config.ffn!r} (Llama uses SwiGLU)")
    if config.qk_norm:
        problems.append("qk_norm=True (Llama has no QK-norm)")
    if problems:
        raise ValueError("LlamaForCausalLM cannot express this DecoderConfig: " + "; ".join(problems))
    return LlamaConfig(
        **{theirs: getattr(config, ours) for ours, theirs in _SAME_FIELDS.items()},
        intermediate_size=config.ffn_dim,
        head_dim=config.head_dim,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def decoder_to_hf(model: DecoderLM):
    """A ``LlamaForCausalLM`` holding copies of ``model``'s weights (dropout, a training-only setting, is
    not carried over). A weightless RMSNorm becomes a Llama RMSNorm with weight 1."""
    from transformers import LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(llama_config(c)).to(dtype=model.lm_head.weight.dtype)
    h, kv, hd = c.n_head, c.n_kv_head, c.head_dim
    sd = {
        "model.embed_tokens.weight": model.tok_emb.weight,
        "model.norm.weight": _norm_weight(model.norm_f, c),
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        for name, t in zip(
            ("q_proj", "k_proj", "v_proj"), block.attn.qkv.weight.split((h * hd, kv * hd, kv * hd))
        ):
            sd[p + f"self_attn.{name}.weight"] = t
        sd[p + "self_attn.o_proj.weight"] = block.attn.proj.weight
        gate, up = block.ffn.gate_up.weight.chunk(2, dim=0)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = block.ffn.down.weight
        sd[p + "input_layernorm.weight"] = _norm_weight(block.norm1, c)
        sd[p + "post_attention_layernorm.weight"] = _norm_weight(block.norm2, c)
        if c.bias:
            for name, t in zip(
                ("q_proj", "k_proj", "v_proj"), block.attn.qkv.bias.split((h * hd, kv * hd, kv * hd))
            ):
                sd[p + f"self_attn.{name}.bias"] = t
            sd[p + "self_attn.o_proj.bias"] = block.attn.proj.bias
            gate_b, up_b = block.ffn.gate_up.bias.chunk(2)
            sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"] = gate_b, up_b
            sd[p + "mlp.down_proj.bias"] = block.ffn.down.bias
    if c.tie_embeddings:
        del sd["lm_head.weight"]
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (c.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"weight mapping to Llama is incomplete: missing {missing}, unexpected {unexpected}"
        )
    if c.tie_embeddings:
        hf.tie_weights()
    return hf.to(model.lm_head.weight.device).eval()


def _norm_weight(norm, config: DecoderConfig) -> torch.Tensor:
    """The norm's weight, or ones for a weightless RMSNorm."""
    return norm.weight if norm.weight is not None else torch.ones(config.d_model)


def decoder_from_hf(hf_model) -> DecoderLM:
    """A DecoderLM with the weights of a ``LlamaForCausalLM`` (any head counts, GQA, rope_theta, tied or
    untied embeddings, with or without biases). ValueError for Llama settings we do not model."""
    hc = hf_model.config
    rope = dict(getattr(hc, "rope_parameters", None) or {})
    problems = []
    if hc.hidden_act != "silu":
        problems.append(f"hidden_act={hc.hidden_act!r} (we implement SwiGLU with silu)")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (we implement plain RoPE)")
    if hc.head_dim != hc.hidden_size // hc.num_attention_heads:
        problems.append(f"head_dim={hc.head_dim} != hidden_size / num_attention_heads")
    if bool(hc.attention_bias) != bool(hc.mlp_bias):
        problems.append("attention_bias != mlp_bias (our bias flag covers both)")
    if problems:
        raise ValueError("cannot convert this Llama: " + "; ".join(problems))
    config = DecoderConfig(
        **{ours: getattr(hc, theirs) for ours, theirs in _SAME_FIELDS.items()},
        d_ff=hc.intermediate_size,
        norm="rmsnorm",
        norm_placement="pre",
        pos="rope",
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        qk_norm=False,
        ffn="swiglu",
        tie_embeddings=bool(hc.tie_word_embeddings),
        bias=bool(hc.attention_bias),
        dropout=0.0,
    )
    sd = hf_model.state_dict()
    ours = {
        "tok_emb.weight": sd["model.embed_tokens.weight"],
        "norm_f.weight": sd["model.norm.weight"],
        "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    for i in range(config.n_layer):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        ours[q + "attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        ours[q + "attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        ours[q + "ffn.gate_up.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]
        )
        ours[q + "ffn.down.weight"] = sd[p + "mlp.down_proj.weight"]
        ours[q + "norm1.weight"] = sd[p + "input_layernorm.weight"]
        ours[q + "norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        if config.bias:
            ours[q + "attn.qkv.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            ours[q + "attn.proj.bias"] = sd[p + "self_attn.o_proj.bias"]
            ours[q + "ffn.gate_up.bias"] = torch.cat(
                [sd[p + "mlp.gate_proj.bias"], sd[p + "mlp.up_proj.bias"]]
            )
            ours[q + "ffn.down.bias"] = sd[p + "mlp.down_proj.bias"]
    weight = hf_model.lm_head.weight
    model = DecoderLM(config).to(device=weight.device, dtype=weight.dtype)
    model.load_state_dict({k: v.detach().clone() for k, v in ours.items()}, strict=True)
    return model.eval()
