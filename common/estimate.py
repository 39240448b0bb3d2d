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


# ----------------------------------------------------------------------------- weight memory

BITS = (2, 3, 4, 8, 16, 32)


def linear_shapes(config) -> list[tuple[str, int, int, int]]:
    """The matrices that weight-only quantisation (GPTQ, AWQ) rewrites: ``(name, in_features,
    out_features, count)`` for every attention and feed-forward matrix of every layer (routed and shared
    experts included). Left out, and kept in 16 bits by those methods: embeddings, the output head,
    norms, biases and MoE routers."""
    s = model_shape(config)
    d, h, n = s.d_model, s.n_head, s.n_layer
    if s.is_mla:
        nope = s.head_dim - s.qk_rope_head_dim
        q = (
            [("q_a", d, s.q_lora_rank, n), ("q_b", s.q_lora_rank, h * s.head_dim, n)]
            if s.q_lora_rank
            else [("q", d, h * s.head_dim, n)]
        )
        attn = q + [
            ("kv_a", d, s.kv_lora_rank + s.qk_rope_head_dim, n),
            ("kv_b", s.kv_lora_rank, h * (nope + s.v_head_dim), n),
            ("o", h * s.v_head_dim, d, n),
        ]
    else:
        attn = [
            ("q", d, h * s.head_dim, n),
            ("k", d, s.n_kv_head * s.head_dim, n),
            ("v", d, s.n_kv_head * s.head_dim, n),
            ("o", h * s.head_dim, d, n),
        ]

    def ffn(name: str, width: int, count: int) -> list[tuple[str, int, int, int]]:
        up = [(f"{name}.gate", d, width, count), (f"{name}.up", d, width, count)] if s.gated_ffn else []
        return (up or [(f"{name}.fc", d, width, count)]) + [(f"{name}.down", width, d, count)]

    n_dense = s.n_dense_layers if s.is_moe else n
    mats = attn + (ffn("mlp", s.d_ff, n_dense) if n_dense else [])
    if s.is_moe:
        mats += ffn("expert", s.d_ff_expert, s.n_moe_layers * s.n_experts)
        if s.n_shared_experts:
            mats += ffn("shared", s.d_ff_expert * s.n_shared_experts, s.n_moe_layers)
    return [m for m in mats if m[3] > 0]


def _check_bits(bits) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")


def weight_bytes(config, bits: int = 16, group_size: int | None = None, keep_bits: int = 16) -> int:
    """Bytes of all weights with the matrices of :func:`linear_shapes` at ``bits`` per weight.

    At 16 or 32 bits every parameter is stored at that width (Llama-2-70B at 16 bits: 2 × 68,976,648,192
    bytes). Below 16 bits the quantised matrices take ``bits`` per weight plus, per group of
    ``group_size`` consecutive input weights of one output row (``None``: the whole row, per-channel), a
    16-bit scale and a ``bits``-wide zero point, as GPTQ/AWQ store them; everything else (embeddings,
    output head, norms, biases, routers) stays at ``keep_bits``.
    """
    _check_bits(bits)
    total = count_params(config)["total"]
    if bits >= 16:
        if group_size is not None:
            raise ValueError(f"group_size applies to quantised weights (bits < 16), got bits={bits}")
        return total * bits // 8
    mats = linear_shapes(config)
    if group_size is not None:
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        for name, fan_in, _, _ in mats:
            if fan_in % group_size:
                raise ValueError(
                    f"group_size {group_size} does not divide the input width {fan_in} of {name}"
                )
    quantised = sum(i * o * c for _, i, o, c in mats)
    groups = sum(o * c * (i // group_size if group_size else 1) for _, i, o, c in mats)
    bits_total = quantised * bits + groups * (16 + bits) + (total - quantised) * keep_bits
    return -(-bits_total // 8)


# ----------------------------------------------------------------------------- KV cache


def kv_cache_bytes(
    config, batch: int, seq_len: int, bytes_per_value: int = 2, mla: str = "compressed"
) -> int:
    """Bytes of the key/value cache for ``batch`` sequences of ``seq_len`` tokens.

    MHA/GQA/MQA: ``layers · batch · seq_len · kv_heads · (k_head_dim + v_head_dim) · bytes``
    (``2 · layers · batch · seq_len · kv_heads · head_dim · bytes`` when keys and values are equally wide).
    MLA (DeepSeek-V2/V3) with ``mla="compressed"``: the latent ``kv_lora_rank + qk_rope_head_dim`` values
    per token per layer, what DeepSeek's inference and transformers' ``DeepseekV3`` (5.x) cache;
    ``mla="expanded"``: the full per-head keys and values a naive MLA implementation would cache.
    """
    _positive("batch", batch)
    _positive("seq_len", seq_len)
    _positive("bytes_per_value", bytes_per_value)
    if mla not in ("compressed", "expanded"):
        raise ValueError(f"mla must be 'compressed' or 'expanded', got {mla!r}")
    s = model_shape(config)
    if s.is_mla and mla == "compressed":
        per_token = s.kv_lora_rank + s.qk_rope_head_dim
    else:
        per_token = s.n_kv_head * (s.head_dim + s.v_head_dim)
    return s.n_layer * batch * seq_len * per_token * bytes_per_value


# ----------------------------------------------------------------------------- training memory

OPTIMIZERS = ("sgd", "adamw", "muon")


def activation_bytes(
    config,
    batch: int,
    seq_len: int,
    checkpointing: bool = False,
    bytes_per_value: int = 4,
    fused_loss: bool = False,
) -> int:
    """Bytes autograd keeps for the backward pass of a pre-norm RMSNorm/RoPE decoder (our DecoderLM), with
    the plain head (logits, then cross-entropy) or, with ``fused_loss``, the fused linear + cross-entropy
    head (``DecoderLM(..., fused_loss=True)``).

    Per token per layer (values): the two norms keep their inputs and 1/rms and the matrix products their
    inputs (``5·d + 2``), attention keeps the rotated queries and keys, the q/k/v projection, the output
    and its transposed copy, and a log-sum-exp per head; a gated feed-forward keeps the gate/up product,
    the activation and the down projection's input (``4·d_ff``; a two-matrix MLP ``2·d_ff``). Outside the
    layers: ``3·d + 1`` values per token for the final norm and the head, the token ids, and the RoPE
    tables; the plain head keeps the log-softmax of the logits (``vocab`` per token) and a scalar, the fused
    head instead its weight gradient (``vocab · d``), whatever the number of tokens. ``checkpointing``
    (one checkpoint per layer) keeps each layer's input and recomputes one layer at a time during the
    backward pass.
    (``tests/test_estimate.py`` checks this count against autograd's saved tensors.)
    """
    _positive("batch", batch)
    _positive("seq_len", seq_len)
    s = model_shape(config)
    d, h, kv, hd = s.d_model, s.n_head, s.n_kv_head, s.head_dim
    attn = (h + kv) * hd + (h + 2 * kv) * hd + h + 2 * h * s.v_head_dim
    ffn_width = s.d_ff if not s.is_moe else s.top_k * s.d_ff_expert + s.d_ff_expert * s.n_shared_experts
    layer = 5 * d + 2 + attn + (4 if s.gated_ffn else 2) * ffn_width
    tokens = batch * seq_len
    head = s.vocab_size * d if fused_loss else tokens * s.vocab_size + 1
    outside = tokens * (3 * d + 1 + 2) + head + 2 * seq_len * hd
    layers = (s.n_layer * d + layer) * tokens if checkpointing else s.n_layer * layer * tokens
    return (layers + outside) * bytes_per_value


def loss_head_bytes(config, tokens: int, fused_loss: bool = False, bytes_per_value: int = 4) -> int:
    """Transient memory of the loss head during the backward pass, beside the saved activations.

    Plain head (``logits, loss = model(idx, targets)``): while cross-entropy's backward runs, the logits
    (kept by the caller, who got them back), the gradient of the log-probabilities and the gradient of
    the logits are alive together with the saved log-softmax (counted in :func:`activation_bytes`):
    ``3 · tokens · vocab`` values. Fused head (:mod:`common.models.fused_cross_entropy`): a chunk's fp32
    logits and their log-softmax, alive together; a chunk holds at most ``LOGITS_PER_CHUNK`` logits.
    """
    s = model_shape(config)
    if not fused_loss:
        return 3 * tokens * s.vocab_size * bytes_per_value
    from common.models.fused_cross_entropy import LOGITS_PER_CHUNK

    chunk_tokens = min(tokens, max(1, LOGITS_PER_CHUNK // s.vocab_size))
    return 2 * chunk_tokens * s.vocab_size * 4


def optimizer_state_bytes(config, optimizer: str = "adamw", state_bytes: int = 4) -> int:
    """AdamW: two moments per parameter; SGD with momentum: one; Muon (on the hidden matrices, with AdamW
    on embeddings, head, norms, biases and routers, as :func:`common.training.build_optimizer` splits
    them): one momentum per matrix weight plus AdamW's two moments for the rest."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    p = count_params(config)["total"]
    if optimizer == "adamw":
        return 2 * p * state_bytes
    if optimizer == "sgd":
        return p * state_bytes
    matrices = sum(i * o * c for _, i, o, c in linear_shapes(config))
    return (matrices + 2 * (p - matrices)) * state_bytes


def training_memory(
    config,
    batch: int,
    seq_len: int,
    optimizer: str = "adamw",
    mixed_precision: bool = False,
    checkpointing: bool = False,
    zero_stage: int = 0,
    world_size: int = 1,
    fused_loss: bool = False,
) -> dict:
    """Bytes per rank of a training step, by part.

    fp32 training keeps 4-byte weights and gradients and 4-byte optimizer states; mixed precision
    (ZeRO paper's setting, Rajbhandari et al. 2020) keeps 2-byte weights and gradients plus a 4-byte
    master copy counted with the optimizer states (AdamW: 4 + 8 = 12 bytes per parameter, the paper's
    K = 12) and 2-byte activations. ZeRO stage 1 divides the optimizer states over ``world_size``
    ranks, stage 2 the gradients too, stage 3 the weights too. ``loss_head`` is the head's transient
    working set in the backward pass (:func:`loss_head_bytes`: the plain head's logits and their
    gradients, or the fused head's chunk). The total adds every part, as if all were alive at once.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    _positive("world_size", world_size)
    p = count_params(config)["total"]
    wb = 2 if mixed_precision else 4
    weights, grads = p * wb, p * wb
    opt = optimizer_state_bytes(config, optimizer) + (4 * p if mixed_precision else 0)
    if zero_stage >= 1:
        opt /= world_size
    if zero_stage >= 2:
        grads /= world_size
    if zero_stage >= 3:
        weights /= world_size
    act = activation_bytes(config, batch, seq_len, checkpointing, bytes_per_value=wb, fused_loss=fused_loss)
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": opt,
        "activations": act,
        "loss_head": loss_head_bytes(config, batch * seq_len, fused_loss, bytes_per_value=wb),
    }
    return {k: int(v) for k, v in parts.items()} | {"total": int(sum(parts.values()))}


def inference_memory(
    config,
    batch: int,
    seq_len: int,
    bytes_per_value: int = 4,
    bits: int | None = None,
    prompt_len: int | None = None,
) -> dict:
    """Bytes of a generation pass that caches ``seq_len`` tokens per sequence: the weights (at ``bits`` or
    ``8·bytes_per_value``), the KV cache, and the largest transient, that of the prompt pass over
    ``batch · prompt_len`` tokens (default ``prompt_len = seq_len``): one layer's hidden states, q/k/v
    and feed-forward intermediates, and the last position's logits."""
    prompt = seq_len if prompt_len is None else prompt_len
    _positive("prompt_len", prompt)
    if prompt > seq_len:
        raise ValueError(f"prompt_len {prompt} is longer than seq_len {seq_len}")
    s = model_shape(config)
    w = weight_bytes(s, bits or 8 * bytes_per_value)
    kv = kv_cache_bytes(s, batch, seq_len, bytes_per_value)
    tokens = batch * prompt
    ffn_width = s.d_ff if not s.is_moe else s.top_k * s.d_ff_expert
    per_token = 2 * s.d_model + (s.n_head + 2 * s.n_kv_head) * s.head_dim + 3 * ffn_width
    transient = (tokens * per_token + batch * s.vocab_size) * bytes_per_value
    return {"weights": w, "kv_cache": kv, "transient": transient, "total": w + kv + transient}


# ----------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """Peak dense throughput (TFLOP/s, or TOPS for int8) and memory of one accelerator or machine."""

    name: str
    fp32_tflops: float
    bf16_tflops: float  # tensor-core bf16/fp16 with fp32 accumulation, dense (no 2:4 sparsity)
    int8_tops: float
    bandwidth_gbs: float  # memory bandwidth, GB/s (10^9 bytes)
    memory_gb: float  # the capacity the device really has, in GB of 10^9 bytes (see GPUS)

    def tflops(self, dtype: str) -> float:
        table = {
            "fp32": self.fp32_tflops,
            "bf16": self.bf16_tflops,
            "fp16": self.bf16_tflops,
            "int8": self.int8_tops,
        }
        if dtype not in table:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")
        return table[dtype]


def _mib(n: int) -> float:
    """``n`` MiB (2^20 bytes) in GB (10^9 bytes)."""
    return n * 2**20 / 1e9


# Datasheet figures, dense (without 2:4 sparsity). Sources: NVIDIA's Ada Lovelace architecture whitepaper
# (RTX 4090; the RTX 4060 by its 96 tensor cores at 2.46 GHz, NVIDIA's product page giving 242 AI TOPS with
# sparsity, 272 GB/s), NVIDIA's Ampere GA102 whitepaper (RTX 3090: FP16 tensor with FP32 accumulate
# 35.6 TFLOPS), the A100 datasheet (SXM, 40 GB at 1,555 GB/s, 80 GB at 2,039 GB/s), the H100 datasheet
# (SXM and PCIe), the H200 datasheet (H100 SXM's compute, 4.8 TB/s), the L4 datasheet.
# Memory: a datasheet's "80 GB" is binary (80 GiB of HBM, 85.9 GB), so the table holds the capacity
# NVML (nvidia-smi) reports, in MiB, turned into GB of 10^9 bytes: 81,920 MiB for an A100 80 GB,
# 40,960 MiB for the 40 GB, 81,559 MiB for an H100 80 GB, 143,771 MiB for an H200, 23,034 MiB for an L4
# (Modal's table of nvidia-smi totals); the GeForce cards at their GDDR chips' binary capacity
# (24 GiB, 8 GiB), which their drivers report less a few MiB.
GPUS: dict[str, Hardware] = {
    g.name: g
    for g in (
        Hardware("rtx-4060", 15.1, 30.2, 121.0, 272, _mib(8 * 1024)),
        Hardware("rtx-3090", 35.6, 35.6, 284.0, 936, _mib(24 * 1024)),
        Hardware("rtx-4090", 82.6, 165.2, 660.6, 1008, _mib(24 * 1024)),
        Hardware("a100-40gb", 19.5, 312.0, 624.0, 1555, _mib(40_960)),
        Hardware("a100-80gb", 19.5, 312.0, 624.0, 2039, _mib(81_920)),
        Hardware("h100-sxm", 67.0, 989.4, 1978.9, 3350, _mib(81_559)),
        Hardware("h100-pcie", 51.2, 756.0, 1513.0, 2000, _mib(81_559)),
        Hardware("h200", 67.0, 989.4, 1978.9, 4800, _mib(143_771)),
        Hardware("l4", 30.3, 121.0, 242.5, 300, _mib(23_034)),
    )
}


def gpu(name) -> Hardware:
    """A :class:`Hardware` by name from :data:`GPUS` (or the Hardware itself)."""
    if isinstance(name, Hardware):
        return name
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[name]


# ----------------------------------------------------------------------------- deployment plans

# (bits, group size, label) of the precisions a deployment plan tries, as GPTQ/AWQ store them
DEPLOY_PRECISIONS = ((16, None, "fp16"), (8, 128, "int8 g128"), (4, 128, "int4 g128"))


def check_tensor_parallel(config, tp: int) -> None:
    """ValueError unless a dense MHA/GQA decoder splits evenly over ``tp`` tensor-parallel ranks: its query
    and key/value heads, its feed-forward's hidden units and its width (the output head's input)."""
    _positive("tp", tp)
    s = model_shape(config)
    if tp == 1:
        return
    if s.is_moe or s.is_mla:
        raise ValueError(
            f"the tensor-parallel split is modelled for dense MHA/GQA decoders, not {s.family} "
            "(experts or latent attention)"
        )
    for what, n in (
        ("attention heads", s.n_head),
        ("key/value heads", s.n_kv_head),
        ("feed-forward units", s.d_ff),
        ("model width (the output head's input)", s.d_model),
    ):
        if n % tp:
            raise ValueError(f"{n} {what} do not divide over {tp} tensor-parallel processes")


def tensor_parallel_weight_bytes(
    config, tp: int = 1, bits: int = 16, group_size: int | None = None, keep_bits: int = 16
) -> dict:
    """Bytes of the weights that each of ``tp`` tensor-parallel ranks holds (Megatron-LM's split, as
    DeepSpeed's AutoTP makes it), the model stored as :func:`weight_bytes` stores it.

    Split over the ranks: attention by heads (each rank's rows of q, k and v, the matching columns of the
    output projection), the feed-forward by hidden units (gate/up rows, down columns), and the output head
    by its input features (DeepSpeed's ``LmHeadLinearAllreduce``). On every rank whole: the token (and
    position) embedding, the norms, and the biases of the two row-parallel projections, added after their
    all-reduce. Returns ``split`` (the split part's bytes, all ranks together), ``replicated`` (one copy)
    and ``per_rank = split / tp + replicated``; at ``tp = 1`` ``per_rank`` equals :func:`weight_bytes`.
    """
    check_tensor_parallel(config, tp)
    s = model_shape(config)
    if tp > 1 and group_size is not None:
        for name, width in (("o", s.n_head * s.head_dim // tp), ("down", s.d_ff // tp)):
            if width % group_size:
                raise ValueError(
                    f"group_size {group_size} does not divide a rank's {width} input features of {name}"
                )
    full = weight_bytes(s, bits, group_size, keep_bits)
    p = count_params(s)
    replicated_params = p["embedding"] + p["norm"] + s.n_layer * s.d_model * (s.o_bias + s.mlp_bias)
    replicated = -(-replicated_params * (bits if bits >= 16 else keep_bits) // 8)
    split = full - replicated
    return {"split": split, "replicated": replicated, "per_rank": -(-split // tp) + replicated}


def deployment_plan(config, tp: int = 1, precisions=DEPLOY_PRECISIONS, gpus=None) -> list[dict]:
    """For each precision ``(bits, group, label)`` and GPU (default every GPU of :data:`GPUS`), with the
    model split over ``tp`` such GPUs: the weights one GPU holds (:func:`tensor_parallel_weight_bytes`),
    whether they fit, the memory left, and how many tokens of fp16 KV cache (batch 1) that memory holds,
    each GPU caching its own key/value heads (``kv_cache_bytes / tp`` per token)."""
    kv_per_token = kv_cache_bytes(config, batch=1, seq_len=1) // tp
    rows = []
    for bits, group, label in precisions:
        w = tensor_parallel_weight_bytes(config, tp, bits, group)["per_rank"]
        for name in gpus or GPUS:
            hw = gpu(name)
            left = hw.memory_gb * 1e9 - w
            rows.append(
                {
                    "precision": label,
                    "gpu": hw.name,
                    "weights_gb": w / 1e9,
                    "memory_gb": hw.memory_gb,
                    "fits": left > 0,
                    "left_gb": left / 1e9,
                    "context_tokens": int(max(left, 0) // kv_per_token),
                }
            )
    return rows


# ----------------------------------------------------------------------------- latency and throughput


def _dtype_bytes(dtype: str) -> int:
    sizes = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
    if dtype not in sizes:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(sizes)}")
    return sizes[dtype]


def prefill_latency(
    config, hardware, batch: int, prompt_len: int, dtype: str = "bf16", mfu: float = 1.0
) -> dict:
    """Roofline time of the prompt pass: the larger of compute time (FLOPs over peak × ``mfu``) and memory
    time (weights read once over bandwidth). Long prompts make it compute-bound."""
    _positive("batch", batch)
    _positive("prompt_len", prompt_len)
    hw = gpu(hardware)
    s = model_shape(config)
    # each prompt token attends to (t + 1) keys on average: half the context
    flops = batch * prompt_len * flops_per_token(s, max(1, (prompt_len + 1) // 2))
    compute_s = flops / (hw.tflops(dtype) * 1e12 * mfu)
    memory_s = weight_bytes(s, 8 * _dtype_bytes(dtype)) / (hw.bandwidth_gbs * 1e9)
    return {"flops": flops, "compute_s": compute_s, "memory_s": memory_s, "seconds": max(compute_s, memory_s)}


def decode_latency(
    config, hardware, batch: int, context_len: int, dtype: str = "bf16", mfu: float = 1.0
) -> dict:
    """Roofline time of one decode step (one new token for each of ``batch`` sequences at ``context_len``):
    the larger of memory time (all weights + the KV cache read once, over bandwidth) and compute time.
    For an MoE model at batch 1 only the active experts' weights are read; at larger batches this model
    keeps reading all of them (a pessimistic bound for small batches)."""
    _positive("batch", batch)
    _positive("context_len", context_len)
    hw = gpu(hardware)
    s = model_shape(config)
    nbytes = _dtype_bytes(dtype)
    p = count_params(s)
    weights = weight_bytes(s, 8 * nbytes)
    if s.is_moe and batch == 1:
        weights = weights * p["active"] // p["total"]
    kv = kv_cache_bytes(s, batch, context_len, nbytes)
    memory_s = (weights + kv) / (hw.bandwidth_gbs * 1e9)
    flops = batch * flops_per_token(s, context_len)
    compute_s = flops / (hw.tflops(dtype) * 1e12 * mfu)
    return {
        "bytes": weights + kv,
        "flops": flops,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "seconds": max(memory_s, compute_s),
        "bound": "memory" if memory_s >= compute_s else "compute",
    }


def crossover_batch(config, hardware, context_len: int = 1, dtype: str = "bf16") -> float:
    """Batch size at which a decode step turns compute-bound: the hardware's FLOPs per byte (its ridge
    point) over the step's FLOPs per byte of weights (≈ 2 FLOPs per weight per sequence), counting the KV
    cache, which grows with the batch too. ``inf`` when the KV cache alone (about 1 FLOP per byte read)
    keeps decode memory-bound at any batch, as full multi-head attention does at long contexts."""
    hw = gpu(hardware)
    s = model_shape(config)
    nbytes = _dtype_bytes(dtype)
    ridge = hw.tflops(dtype) * 1e12 / (hw.bandwidth_gbs * 1e9)  # FLOPs per byte
    f = flops_per_token(s, context_len)
    w = weight_bytes(s, 8 * nbytes)
    kv1 = kv_cache_bytes(s, 1, context_len, nbytes)
    # batch · f = ridge · (w + batch · kv1)  ->  batch = ridge · w / (f - ridge · kv1)
    denom = f - ridge * kv1
    return float("inf") if denom <= 0 else ridge * w / denom


def generation_time(
    config, hardware, batch: int, prompt_len: int, new_tokens: int, dtype: str = "bf16", mfu: float = 1.0
) -> dict:
    """Time to first token (the prompt pass), time per output token (a decode step at the mean context),
    the whole request's time and the throughput in generated tokens per second."""
    _positive("new_tokens", new_tokens)
    ttft = prefill_latency(config, hardware, batch, prompt_len, dtype, mfu)["seconds"]
    tpot = decode_latency(config, hardware, batch, prompt_len + new_tokens // 2, dtype, mfu)["seconds"]
    total = ttft + (new_tokens - 1) * tpot
    return {"ttft_s": ttft, "tpot_s": tpot, "total_s": total, "tokens_per_s": batch * new_tokens / total}


def littles_law(
    arrival_rate: float | None = None, latency_s: float | None = None, concurrency: float | None = None
):
    """Little's law ``L = λ · W``: give two of (arrival rate λ in requests/s, time in the system W in
    seconds, requests in the system L) and get the third."""
    given = {
        k: v
        for k, v in dict(arrival_rate=arrival_rate, latency_s=latency_s, concurrency=concurrency).items()
        if v is not None
    }
    if len(given) != 2:
        raise ValueError(f"give exactly two of arrival_rate, latency_s, concurrency; got {sorted(given)}")
    for k, v in given.items():
        if v <= 0:
            raise ValueError(f"{k} must be positive, got {v}")
    if concurrency is None:
        return arrival_rate * latency_s
    if latency_s is None:
        return concurrency / arrival_rate
    return concurrency / latency_s
