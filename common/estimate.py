"""Back-of-the-envelope estimators for a decoder LM: parameters, FLOPs, memory, latency, throughput.

Every estimator takes a *model config* in any of these forms and reduces it to one :class:`ModelShape`:

- a transformers config object: Llama, Mistral, Qwen2, Mixtral, DeepseekV3 (MLA with ``q_lora_rank`` /
  ``kv_lora_rank``, ``first_k_dense_replace`` dense layers, shared experts) or GPT-2;
- this repository's :class:`common.models.decoder.DecoderConfig`;
- a named preset (``llama-2-7b``, ``mixtral-8x7b``, ``deepseek-v3``, ``gpt2-xl``, ...: :data:`PRESETS`),
  built as a transformers config offline;
- a path to a local ``config.json`` (or a folder holding one).

:func:`count_params` counts parameters part by part; its ``total`` equals ``sum(p.numel())`` of the
transformers model built from the same config (checked on the meta device in ``tests/test_estimate.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# ----------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """What the estimators need to know about a decoder LM, whatever config it came from."""

    family: str
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int  # per-head width of queries and keys (MLA: nope + rope part)
    v_head_dim: int  # per-head width of values
    d_ff: int  # width of the dense feed-forward
    gated_ffn: bool  # three matrices (SwiGLU) or two (GELU MLP)
    context_length: int
    tie_embeddings: bool
    learned_pos: bool = False  # a (context_length, d_model) position table (GPT-2)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_weight: bool = True  # each norm has a weight vector ...
    norm_bias: bool = False  # ... and a bias vector (LayerNorm)
    final_norm: bool = True
    qk_norm: bool = False  # one norm over head_dim on queries and one on keys, per layer
    # mixture of experts: layers [n_dense_layers, n_layer) route each token to top_k of n_experts
    n_experts: int = 0
    top_k: int = 0
    d_ff_expert: int = 0
    n_shared_experts: int = 0  # always-on experts of width d_ff_expert each (DeepSeek), one fused MLP
    n_dense_layers: int = 0
    # multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank = 0 means ordinary MHA/GQA/MQA
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layer - self.n_dense_layers if self.is_moe else 0


# ----------------------------------------------------------------------------- presets and loading

# Published architectures, as transformers configs (sources: the models' config.json on the Hugging Face
# hub: meta-llama/Llama-2-{7b,13b,70b}-hf, mistralai/Mixtral-8x7B-v0.1, deepseek-ai/DeepSeek-V3 (HF's
# DeepseekV3Config defaults), openai-community/gpt2{,-medium,-large,-xl}).
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
PRESETS: dict[str, tuple[str, dict]] = {
    "llama-2-7b": (
        "LlamaConfig",
        dict(
            _LLAMA2,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
    ),
    "llama-2-13b": (
        "LlamaConfig",
        dict(
            _LLAMA2,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
        ),
    ),
    "llama-2-70b": (
        "LlamaConfig",
        dict(
            _LLAMA2,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
    ),
    "mixtral-8x7b": ("MixtralConfig", dict(max_position_embeddings=32768)),  # HF's defaults are 8x7B
    "deepseek-v3": ("DeepseekV3Config", dict()),  # HF's defaults are DeepSeek-V3 (without its MTP layer)
    "gpt2": ("GPT2Config", dict(n_embd=768, n_layer=12, n_head=12)),
    "gpt2-medium": ("GPT2Config", dict(n_embd=1024, n_layer=24, n_head=16)),
    "gpt2-large": ("GPT2Config", dict(n_embd=1280, n_layer=36, n_head=20)),
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25)),
}

FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "deepseek_v3", "gpt2")
ACCEPTED = (
    f"a transformers config of model_type {', '.join(FAMILIES)}; a common.models.decoder.DecoderConfig; "
    f"a ModelShape; a preset name ({', '.join(PRESETS)}); or a path to a local config.json"
)


def preset_config(name: str):
    """The transformers config object of a named preset (built offline)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    import transformers

    cls_name, kwargs = PRESETS[name]
    return getattr(transformers, cls_name)(**kwargs)


def load_config(path: str):
    """A transformers config from a local ``config.json`` (or a folder that holds one); no download."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json at {path!r}")
    with open(path) as f:
        data = json.load(f)
    model_type = data.pop("model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; choose one of {', '.join(FAMILIES)}"
        )
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **data)


def model_shape(config) -> ModelShape:
    """Reduce any accepted config (see the module docstring) to a :class:`ModelShape`."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str):
        if config in PRESETS:
            return model_shape(preset_config(config))
        if os.path.exists(config):
            return model_shape(load_config(config))
        raise ValueError(f"unknown model {config!r}; accepted: {ACCEPTED}")
    from common.models.decoder import DecoderConfig

    if isinstance(config, DecoderConfig):
        return _shape_from_decoder(config)
    model_type = getattr(config, "model_type", None)
    if model_type in ("llama", "mistral", "qwen2", "mixtral"):
        return _shape_from_llama_like(config)
    if model_type == "deepseek_v3":
        return _shape_from_deepseek_v3(config)
    if model_type == "gpt2":
        return _shape_from_gpt2(config)
    raise ValueError(
        f"unsupported model config {type(config).__name__} ({model_type!r}); accepted: {ACCEPTED}"
    )


def _shape_from_decoder(c) -> ModelShape:
    return ModelShape(
        family="decoder",
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_kv_head=c.n_kv_head,
        head_dim=c.head_dim,
        v_head_dim=c.head_dim,
        d_ff=c.ffn_dim,
        gated_ffn=c.ffn == "swiglu",
        context_length=c.context_length,
        tie_embeddings=c.tie_embeddings,
        learned_pos=c.pos == "learned",
        qkv_bias=c.bias,
        o_bias=c.bias,
        mlp_bias=c.bias,
        norm_weight=c.norm != "rmsnorm_noweight",
        norm_bias=c.norm == "layernorm" and c.bias,
        final_norm=c.norm_placement == "pre",
        qk_norm=c.qk_norm,
    )


def _shape_from_llama_like(c) -> ModelShape:
    """Llama, Mistral, Qwen2 (q/k/v biases) and Mixtral (top-k experts in every layer)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qwen = c.model_type == "qwen2"
    moe = c.model_type == "mixtral"
    return ModelShape(
        family=c.model_type,
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim,
        v_head_dim=head_dim,
        d_ff=0 if moe else c.intermediate_size,
        gated_ffn=True,
        context_length=c.max_position_embeddings,
        tie_embeddings=bool(c.tie_word_embeddings),
        qkv_bias=qwen or bool(getattr(c, "attention_bias", False)),
        o_bias=bool(getattr(c, "attention_bias", False)),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        n_experts=c.num_local_experts if moe else 0,
        top_k=c.num_experts_per_tok if moe else 0,
        d_ff_expert=c.intermediate_size if moe else 0,
    )


def _shape_from_deepseek_v3(c) -> ModelShape:
    return ModelShape(
        family="deepseek_v3",
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_kv_head=c.num_key_value_heads,
        head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        d_ff=c.intermediate_size,
        gated_ffn=True,
        context_length=c.max_position_embeddings,
        tie_embeddings=bool(c.tie_word_embeddings),
        qkv_bias=bool(c.attention_bias),
        o_bias=bool(c.attention_bias),
        n_experts=c.n_routed_experts,
        top_k=c.num_experts_per_tok,
        d_ff_expert=c.moe_intermediate_size,
        n_shared_experts=c.n_shared_experts or 0,
        n_dense_layers=min(c.first_k_dense_replace, c.num_hidden_layers),
        q_lora_rank=c.q_lora_rank or 0,
        kv_lora_rank=c.kv_lora_rank,
        qk_rope_head_dim=c.qk_rope_head_dim,
    )


def _shape_from_gpt2(c) -> ModelShape:
    return ModelShape(
        family="gpt2",
        vocab_size=c.vocab_size,
        d_model=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_kv_head=c.n_head,
        head_dim=c.n_embd // c.n_head,
        v_head_dim=c.n_embd // c.n_head,
        d_ff=c.n_inner or 4 * c.n_embd,
        gated_ffn=False,
        context_length=c.n_positions,
        tie_embeddings=bool(c.tie_word_embeddings),
        learned_pos=True,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        norm_bias=True,
    )


# ----------------------------------------------------------------------------- parameters


def _attention_params(s: ModelShape) -> int:
    """One layer's attention matrices and biases (its norms are counted under ``norm``)."""
    d, h = s.d_model, s.n_head
    if s.is_mla:
        if s.q_lora_rank:  # x -> q_lora_rank -> (heads · qk head dim)
            q = d * s.q_lora_rank + s.q_lora_rank * h * s.head_dim + (s.q_lora_rank if s.qkv_bias else 0)
        else:
            q = d * h * s.head_dim
        nope = s.head_dim - s.qk_rope_head_dim
        kv_a = d * (s.kv_lora_rank + s.qk_rope_head_dim) + (s.kv_lora_rank + s.qk_rope_head_dim) * s.qkv_bias
        kv_b = s.kv_lora_rank * h * (nope + s.v_head_dim)
        return q + kv_a + kv_b + h * s.v_head_dim * d + d * s.o_bias
    qkv_out = (h + 2 * s.n_kv_head) * s.head_dim
    return d * qkv_out + qkv_out * s.qkv_bias + h * s.head_dim * d + d * s.o_bias


def _ffn_params(s: ModelShape, d_ff: int, bias: bool) -> int:
    d = s.d_model
    if s.gated_ffn:
        return 3 * d * d_ff + (2 * d_ff + d) * bias
    return 2 * d * d_ff + (d_ff + d) * bias


def _norm_params(s: ModelShape, dim: int) -> int:
    return dim * (s.norm_weight + s.norm_bias)


def count_params(config) -> dict:
    """Parameters of a decoder LM, part by part.

    Returns ``total``, ``active`` (used per token: all but the unchosen routed experts), ``embedding``
    (token and learned position tables), ``lm_head`` (0 when tied to the embedding), ``attention``,
    ``mlp`` (dense feed-forwards, routers, routed and shared experts), ``norm`` (every norm weight and bias,
    MLA's and QK-norm's included), ``non_embedding`` (total minus ``embedding`` and ``lm_head``), and the
    MoE split of ``mlp``: ``dense_mlp``, ``router``, ``experts``, ``shared_experts``, ``expert_size``
    (one routed expert). ``total = embedding + lm_head + attention + mlp + norm``.
    """
    s = model_shape(config)
    d, n = s.d_model, s.n_layer
    embedding = s.vocab_size * d + (s.context_length * d if s.learned_pos else 0)
    lm_head = 0 if s.tie_embeddings else s.vocab_size * d
    attention = n * _attention_params(s)

    norm_per_layer = 2 * _norm_params(s, d)
    if s.qk_norm:
        norm_per_layer += 2 * s.head_dim * s.norm_weight
    if s.is_mla:  # RMSNorms inside MLA's low-rank paths (always with a weight)
        norm_per_layer += s.kv_lora_rank + s.q_lora_rank
    norm = n * norm_per_layer + (_norm_params(s, d) if s.final_norm else 0)

    n_dense = s.n_dense_layers if s.is_moe else n
    dense_mlp = n_dense * _ffn_params(s, s.d_ff, s.mlp_bias)
    expert_size = _ffn_params(s, s.d_ff_expert, False) if s.is_moe else 0
    router = s.n_moe_layers * s.n_experts * d
    experts = s.n_moe_layers * s.n_experts * expert_size
    shared = (
        s.n_moe_layers * _ffn_params(s, s.d_ff_expert * s.n_shared_experts, False)
        if s.n_shared_experts
        else 0
    )
    mlp = dense_mlp + router + experts + shared

    total = embedding + lm_head + attention + mlp + norm
    active = total - s.n_moe_layers * (s.n_experts - s.top_k) * expert_size
    return {
        "total": total,
        "active": active,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": attention,
        "mlp": mlp,
        "norm": norm,
        "non_embedding": total - embedding - lm_head,
        "dense_mlp": dense_mlp,
        "router": router,
        "experts": experts,
        "shared_experts": shared,
        "expert_size": expert_size,
    }


# ----------------------------------------------------------------------------- FLOPs


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def attention_width(config) -> tuple[int, int]:
    """(query-key width, value width) summed over heads: what each token's scores and mix multiply."""
    s = model_shape(config)
    return s.n_head * s.head_dim, s.n_head * s.v_head_dim


def matmul_params(config) -> int:
    """Weights one token multiplies through (active parameters less the embedding lookups; the output
    head counted once even when it shares the embedding's table)."""
    s = model_shape(config)
    p = count_params(s)
    return p["active"] - p["embedding"] + (s.vocab_size * s.d_model if s.tie_embeddings else 0)


def flops_per_token(config, seq_len: int | None = None) -> int:
    """Forward FLOPs for one token that attends to ``seq_len`` keys (default: the full context).

    ``2 ·`` :func:`matmul_params` for the matrix products (a multiply and an add per weight; the output
    head is a matrix product, the embedding lookup is not) plus attention's
    ``2 · layers · seq · (d_qk + d_v)`` for scores and the weighted sum of values
    (``2·2·layers·seq·d_attn`` when query-key and value widths are equal, as Kaplan et al. 2020 count).
    """
    s = model_shape(config)
    seq = s.context_length if seq_len is None else seq_len
    _positive("seq_len", seq)
    d_qk, d_v = attention_width(s)
    return 2 * matmul_params(s) + 2 * s.n_layer * seq * (d_qk + d_v)


def training_flops(config, tokens: int) -> int:
    """Training compute ``6 · N · D``: N = :func:`matmul_params` (a forward's 2 and a backward's 4 FLOPs
    per weight per token), D tokens; attention's sequence term left out, as Kaplan et al. (2020) do."""
    _positive("tokens", tokens)
    return 6 * matmul_params(config) * tokens
