"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

The encoder reads the source with bidirectional self-attention; the decoder writes the target with
causal self-attention plus cross-attention to the encoder's output ("memory"). Each sub-layer is
wrapped in a residual connection and a LayerNorm: after it (Post-LN, the paper) or before it
(Pre-LN, ``norm_first=True``, which trains more stably when deep; it then needs a last LayerNorm at the
end of each stack). :class:`Transformer` maps embedded sequences to embedded sequences, like
``torch.nn.Transformer``; :class:`Seq2SeqTransformer` adds token embeddings, sinusoidal positions, the
output projection and greedy decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models.attention import MultiHeadAttention
from common.models.positional import SinusoidalPositionalEncoding


class FeedForward(nn.Module):
    """The paper's position-wise network: ``W2 relu(W1 x)`` (``activation="gelu"`` is also allowed)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
        self.act = F.relu if activation == "relu" else F.gelu
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.act(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        activation: str = "relu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model, eps=eps), nn.LayerNorm(d_model, eps=eps)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def _sa(self, x, pad):
        return self.drop1(self.self_attn(x, x, x, key_padding_mask=pad))

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_key_padding_mask)
            return x + self.drop2(self.ffn(self.norm2(x)))
        x = self.norm1(x + self._sa(x, src_key_padding_mask))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_ff: int,
        dropout: float = 0.0,
        norm_first: bool = False,
        activation: str = "relu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model, eps=eps) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(3))

    def _sa(self, x, pad):
        return self.drop1(self.self_attn(x, x, x, key_padding_mask=pad, causal=True))

    def _ca(self, x, memory, pad):
        return self.drop2(self.cross_attn(x, memory, memory, key_padding_mask=pad))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self._sa(self.norm1(x), tgt_key_padding_mask)
            x = x + self._ca(self.norm2(x), memory, memory_key_padding_mask)
            return x + self.drop3(self.ffn(self.norm3(x)))
        x = self.norm1(x + self._sa(x, tgt_key_padding_mask))
        x = self.norm2(x + self._ca(x, memory, memory_key_padding_mask))
        return self.norm3(x + self.drop3(self.ffn(x)))


class Transformer(nn.Module):
    """Encoder and decoder stacks: (src (batch, S, d), tgt (batch, T, d)) -> (batch, T, d).

    The decoder's self-attention is always causal. Padding masks are True at padding positions.
    """

    def __init__(
        self,
        d_model: int = 512,
        n_head: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = False,
        activation: str = "relu",
        eps: float = 1e-5,
    ):
        super().__init__()
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation, eps)
            for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, n_head, d_ff, dropout, norm_first, activation, eps)
            for _ in range(num_decoder_layers)
        )
        # Pre-LN leaves each stack's output unnormalised; Post-LN already ends on a LayerNorm
        self.encoder_norm = nn.LayerNorm(d_model, eps=eps) if norm_first else None
        self.decoder_norm = nn.LayerNorm(d_model, eps=eps) if norm_first else None

    def encode(self, src: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = src
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = tgt
        for layer in self.decoder_layers:
            x = layer(x, memory, tgt_key_padding_mask, memory_key_padding_mask)
        return self.decoder_norm(x) if self.decoder_norm is not None else x

    def forward(
        self, src, tgt, src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None
    ):
        memory = self.encode(src, src_key_padding_mask)
        return self.decode(tgt, memory, tgt_key_padding_mask, memory_key_padding_mask)


class Seq2SeqTransformer(nn.Module):
    """Token-level encoder-decoder: embeddings scaled by sqrt(d_model), sinusoidal positions, the
    :class:`Transformer`, and a linear layer to target-vocabulary logits."""

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 128,
        n_head: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        d_ff: int = 512,
        dropout: float = 0.1,
        norm_first: bool = False,
        max_len: int = 256,
        pad_id: int = 0,
    ):
        super().__init__()
        self.d_model, self.pad_id, self.max_len = d_model, pad_id, max_len
        self.src_emb = nn.Embedding(src_vocab, d_model)
        self.tgt_emb = nn.Embedding(tgt_vocab, d_model)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            d_model, n_head, num_encoder_layers, num_decoder_layers, d_ff, dropout, norm_first
        )
        self.generator = nn.Linear(d_model, tgt_vocab)
        # the paper's scaling: embeddings of std d_model^-0.5, times sqrt(d_model) in _embed, are of the
        # same size as the positional table (torch's default std 1 would drown the positions)
        for emb in (self.src_emb, self.tgt_emb):
            nn.init.normal_(emb.weight, std=d_model**-0.5)

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (batch, seq), got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= emb.num_embeddings):
            raise ValueError(
                f"token ids must lie in [0, {emb.num_embeddings}), got min {int(ids.min())}, "
                f"max {int(ids.max())}"
            )
        return self.drop(self.pos(emb(ids) * math.sqrt(self.d_model)))  # (batch, seq, d_model)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src_pad = src == self.pad_id
        return self.transformer.encode(self._embed(self.src_emb, src), src_pad), src_pad

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_pad: torch.Tensor) -> torch.Tensor:
        h = self.transformer.decode(self._embed(self.tgt_emb, tgt), memory, tgt == self.pad_id, src_pad)
        return self.generator(h)  # (batch, T, tgt_vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (batch, S), tgt_in (batch, T) (the target shifted right, BOS first) -> logits (batch, T, V)."""
        memory, src_pad = self.encode(src)
        return self.decode(tgt_in, memory, src_pad)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int) -> torch.Tensor:
        """(batch, S) source ids -> (batch, <= max_len) target ids after BOS; rows that have produced EOS
        are padded with ``pad_id``."""
        memory, src_pad = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self.decode(out, memory, src_pad)[:, -1].argmax(dim=-1)
            nxt = nxt.masked_fill(done, self.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return out[:, 1:]
