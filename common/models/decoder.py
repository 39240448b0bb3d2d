"""The decoder-only language model: a stack of causal self-attention + feed-forward blocks.

Every modern choice is a field of :class:`DecoderConfig` (norm kind and placement, RoPE or learned
positions, MHA/GQA/MQA, QK-norm, GELU/SwiGLU/ReLU², tied embeddings, biases), so a reader can switch
one on and off and see what it costs. With rmsnorm + rope + swiglu + pre-norm + no bias it is exactly a
Llama, and :meth:`DecoderLM.to_hf` / :meth:`DecoderLM.from_hf` convert to and from transformers'
``LlamaForCausalLM``.

``forward(idx, targets)`` follows nanoGPT: ``targets`` are already shifted (targets[:, t] is the token
after idx[:, t]), -100 marks positions to ignore. With targets the loss comes from the fused linear +
cross-entropy (:mod:`common.models.fused_cross_entropy`), which never materialises the (tokens, vocab)
logits, so the returned logits are None unless ``return_logits=True`` asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from common.models.attention import CausalSelfAttention, KVCache
from common.models.feedforward import FFNS, MLP, SwiGLU, default_d_ff, make_feedforward
from common.models.fused_cross_entropy import linear_cross_entropy
from common.models.norms import NORMS, make_norm
from common.models.positional import RotaryEmbedding

PRESETS = {
    "small": dict(n_layer=6, d_model=384, n_head=4, n_kv_head=4),
    "base": dict(n_layer=12, d_model=768, n_head=6, n_kv_head=6),
    "large": dict(n_layer=24, d_model=1536, n_head=12, n_kv_head=6),
}


@dataclass
class DecoderConfig:
    vocab_size: int = 8192
    context_length: int = 512
    n_layer: int = 6
    d_model: int = 384
    n_head: int = 4
    n_kv_head: int = 4  # = n_head: MHA; a divisor: GQA; 1: MQA
    d_ff: int | None = None  # None: 4·d_model (gelu, relu2) or 8/3·d_model rounded to 64 (swiglu)
    norm: str = "rmsnorm"  # "layernorm" | "rmsnorm" | "rmsnorm_noweight"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # "pre" (GPT-2 onward) | "post" (the 2017 Transformer)
    pos: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    qk_norm: bool = False
    ffn: str = "swiglu"  # "gelu" | "swiglu" | "relu2"
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_head <= 0 or self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} must be positive and divide d_model={self.d_model}")
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must be positive and divide n_head={self.n_head}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"RoPE needs an even head dimension, got d_model/n_head = {self.d_model // self.n_head}"
            )
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("norm_placement", self.norm_placement, ("pre", "post")),
            ("pos", self.pos, ("rope", "learned")),
            ("ffn", self.ffn, FFNS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name in ("vocab_size", "context_length", "n_layer", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or default_d_ff(self.ffn, self.d_model)

    @classmethod
    def preset(cls, name: str, **overrides) -> DecoderConfig:
        """A named size ("small", "base", "large") with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> DecoderConfig:
        return replace(self, **changes)


class Block(nn.Module):
    """One decoder layer. Pre-norm: ``x + attn(norm(x))``; post-norm: ``norm(x + attn(x))``."""

    def __init__(self, config: DecoderConfig, layer_idx: int, ffn: nn.Module | None = None):
        super().__init__()
        c = config
        self.pre_norm = c.norm_placement == "pre"
        self.norm1 = make_norm(c.norm, c.d_model, c.norm_eps, bias=c.bias)
        self.attn = CausalSelfAttention(
            c.d_model,
            c.n_head,
            c.n_kv_head,
            layer_idx=layer_idx,
            bias=c.bias,
            qk_norm=c.qk_norm,
            qk_norm_weight=c.norm != "rmsnorm_noweight",
            norm_eps=c.norm_eps,
            dropout=c.dropout,
        )
        self.norm2 = make_norm(c.norm, c.d_model, c.norm_eps, bias=c.bias)
        self.ffn = (
            ffn
            if ffn is not None
            else make_feedforward(c.ffn, c.d_model, c.d_ff, bias=c.bias, dropout=c.dropout)
        )

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, attn_mask, kv_cache)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, attn_mask, kv_cache))
        return self.norm2(x + self.ffn(x))


class DecoderLM(nn.Module):
    """Decoder-only LM. ``ffn_factory(layer_idx, config)`` may return a module (e.g. an MoE layer) to use
    as that layer's feed-forward, or None for the dense default. Feed-forwards that set an ``aux_loss``
    attribute during forward have it added to the loss."""

    def __init__(
        self,
        config: DecoderConfig,
        ffn_factory: Callable[[int, DecoderConfig], nn.Module | None] | None = None,
    ):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.context_length, c.d_model) if c.pos == "learned" else None
        self.rotary = RotaryEmbedding(c.head_dim, c.context_length, c.rope_theta) if c.pos == "rope" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c, i, ffn_factory(i, c) if ffn_factory is not None else None) for i in range(c.n_layer)
        )
        # pre-norm leaves the residual stream unnormalised, so it needs a last norm; post-norm ends on one
        self.norm_f = (
            make_norm(c.norm, c.d_model, c.norm_eps, bias=c.bias) if c.norm_placement == "pre" else None
        )
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.last_ce_loss: torch.Tensor | None = None
        # plugged-in feed-forwards (MoE layers) may set an ``aux_loss`` during forward
        self._aux_modules = [b.ffn for b in self.blocks if not isinstance(b.ffn, (MLP, SwiGLU))]
        plugged = {id(m) for ffn in self._aux_modules for m in ffn.modules()}  # these keep their own init
        for module in self.modules():
            if id(module) not in plugged:
                self._init_weights(module)
        std_out = 0.02 / math.sqrt(2 * c.n_layer)  # GPT-2: scale the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, mean=0.0, std=std_out)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once); ``non_embedding`` leaves out token and position
        embeddings and an untied output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        return_logits: bool = False,
    ):
        """idx (batch, seq) token ids -> (logits (batch, seq, vocab), loss or None).

        positions: (seq,) or (batch, seq) position of each token (default: counting on from the cache);
        attn_mask: boolean (batch, 1, seq, keys), True = may attend (default: causal);
        kv_cache: a :class:`KVCache` to read and extend; last_only: compute logits for the last position only.
        targets (batch, seq): the loss is the mean cross-entropy over targets that are not -100 (plus any
        ``aux_loss`` of plugged-in feed-forwards); it is computed chunk by chunk from the hidden states, so
        logits are returned as None unless ``return_logits`` is True (which computes them in full as well).
        """
        c = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq) token ids, got shape {tuple(idx.shape)}")
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
                )
            if last_only:
                raise ValueError("last_only computes the last position's logits only; it cannot take targets")
        b, t = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + t > c.context_length:
            raise ValueError(
                f"sequence of {start + t} tokens is longer than the context length {c.context_length}"
            )
        if idx.numel() and not torch.compiler.is_exporting():  # torch.export cannot branch on values
            lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one pass, one wait for the device
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"token ids must lie in [0, {c.vocab_size}), got min {lo}, max {hi}")
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device)  # (seq,)
        x = self.tok_emb(idx)  # (batch, seq, d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        for block in self.blocks:
            x = block(x, rope, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += t
        if self.norm_f is not None:
            x = self.norm_f(x)
        if targets is None:
            if last_only:
                x = x[:, -1:]
            return self.lm_head(x), None  # (batch, seq, vocab)
        ce = linear_cross_entropy(x, self.lm_head.weight, targets)
        self.last_ce_loss = ce.detach()
        loss = ce
        for ffn in self._aux_modules:
            aux = getattr(ffn, "aux_loss", None)
            if aux is not None:
                loss = loss + aux
        return (self.lm_head(x) if return_logits else None), loss

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty preallocated cache for ``batch`` sequences of up to ``max_len`` tokens."""
        c = self.config
        p = self.lm_head.weight
        return KVCache(
            c.n_layer,
            batch,
            c.n_kv_head,
            max_len or c.context_length,
            c.head_dim,
            device=p.device,
            dtype=p.dtype,
        )

    def to_hf(self):
        """A ``transformers.LlamaForCausalLM`` with these weights (raises ValueError if Llama cannot express
        this config)."""
        from common.models.hf_llama import decoder_to_hf

        return decoder_to_hf(self)

    @classmethod
    def from_hf(cls, llama_model) -> DecoderLM:
        """A DecoderLM with the weights of a ``transformers.LlamaForCausalLM``."""
        from common.models.hf_llama import decoder_from_hf

        return decoder_from_hf(llama_model)
