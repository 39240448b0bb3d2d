"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, and
batched prompts of different lengths.

Prompts are LEFT-padded to a common length so that every row's next token lands in the same column.
Padding is hidden by an attention mask, and each row counts its positions from its own first real
token, so a padded prompt sees exactly the positions (and RoPE angles) it would see alone.

The cache is preallocated for prompt + new tokens, so each step writes one column in place: after the
prompt's single forward pass (the "prefill"), every step runs the model on one token per row.

A decoding step on a CPU is a chain of matrix-vector products: its time is the time to stream every
weight matrix from memory once. ``nn.Linear`` keeps its weight (out, in) row by row, and ``x @ W.T``
then walks it in the order the BLAS's matrix-vector kernel reads slowest; with the same numbers laid
out column by column (:func:`column_major_weights`) the product streams ``W.T`` row by row, which
MKL does faster on this project's CPU machine (``benchmarks.bench_decoder`` times both layouts), so
``generate`` switches the layout for the duration of a long enough cached generation on a CPU and
switches it back afterwards. The weights keep their values; the products may differ in the last bit,
as any change of BLAS kernel may.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from common.models.attention import causal_mask


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set of most likely
    tokens whose probability reaches top_p; the most likely token always stays). logits: (batch, vocab)."""
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (batch, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) next tokens; temperature 0 is greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# Below this many new tokens the two copies of the weights cost more than the faster steps save
# (``benchmarks.bench_decoder`` times both layouts at this length: the gain there must be >= 1).
COLUMN_MAJOR_MIN_TOKENS = 48


def decode_weights(model: nn.Module) -> list[nn.Parameter]:
    """The matrices a decoding step multiplies one row by: ``nn.Linear`` weights and MoE expert banks."""
    from common.moe.experts import Experts  # (E, out, in) stacks: each expert's matrix alike

    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if type(m) is nn.Linear:
            found[id(m.weight)] = m.weight
        elif isinstance(m, Experts):
            found.update({id(p): p for p in (m.gate_up, m.down)})
    return list(found.values())


def set_weight_layout(model: nn.Module, column_major: bool) -> None:
    """Lay out every decode matrix of ``model`` (:func:`decode_weights`) column- or row-major.

    Shapes, values and parameter objects stay the same (optimizers and tied weights are unaffected);
    only the memory order of the last two dimensions changes. The new tensors are ordinary ones even
    inside inference mode, so the model can train afterwards.
    """
    with torch.inference_mode(False), torch.no_grad():
        for p in decode_weights(model):
            p.data = p.data.mT.contiguous().mT if column_major else p.data.contiguous()


@contextlib.contextmanager
def column_major_weights(model: nn.Module):
    """Column-major decode matrices while the block runs, row-major again afterwards (even if it raises)."""
    set_weight_layout(model, column_major=True)
    try:
        yield model
    finally:
        set_weight_layout(model, column_major=False)


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens=None,
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    column_major: bool | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Returns the new tokens of each prompt, cut before its first stop token (``stop_tokens``: an id or a
    collection of ids). ``use_cache=False`` recomputes the whole sequence every step (the slow reference).
    ``column_major``: decode on column-major weights (:func:`column_major_weights`); None chooses it for
    cached generation on a CPU of at least ``COLUMN_MAJOR_MIN_TOKENS`` new tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ctx = model.config.context_length
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    if width + max_new_tokens > ctx:
        raise ValueError(
            f"longest prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds the context length {ctx}"
        )
    stops = (
        set()
        if stop_tokens is None
        else ({stop_tokens} if isinstance(stop_tokens, int) else set(stop_tokens))
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    batch, total = len(prompts), width + max_new_tokens
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)  # (batch, prompt + new)
    valid = torch.ones(batch, total, dtype=torch.bool, device=device)  # False at padding
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
        valid[i, : width - len(p)] = False
    padded = len(set(lengths)) > 1
    # position of each column in its row: 0 at the row's first real token (padding gets 0 too)
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (batch, total)

    def mask_for(q_start: int, q_end: int) -> torch.Tensor | None:
        """Boolean (batch, 1, q, keys) mask for queries q_start..q_end-1 over keys 0..q_end-1."""
        if not padded:
            return None
        allowed = causal_mask(q_end - q_start, q_end, device) & valid[:, None, :q_end]  # (batch, q, keys)
        # a padding query may see itself, so that its (ignored) row of attention is not all -inf
        diag = torch.arange(q_start, q_end, device=device)
        allowed[:, torch.arange(q_end - q_start, device=device), diag] = True
        return allowed[:, None]

    cache = model.new_kv_cache(batch, total) if use_cache else None
    if column_major is None:
        column_major = use_cache and device.type == "cpu" and max_new_tokens >= COLUMN_MAJOR_MIN_TOKENS
    layout = column_major_weights(model) if column_major else contextlib.nullcontext()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=device)
    end = width
    with layout:
        for step in range(max_new_tokens):
            if cache is None:  # recompute everything so far
                logits, _ = model(
                    tokens[:, :end], positions=positions[:, :end], attn_mask=mask_for(0, end), last_only=True
                )
            elif step == 0:  # prefill: the whole prompt in one pass
                logits, _ = model(
                    tokens[:, :end],
                    positions=positions[:, :end] if padded else None,
                    attn_mask=mask_for(0, end),
                    kv_cache=cache,
                    last_only=True,
                )
            else:  # one new token per row
                logits, _ = model(
                    tokens[:, end - 1 : end],
                    positions=positions[:, end - 1 : end] if padded else None,
                    attn_mask=valid[:, None, None, :end] if padded else None,
                    kv_cache=cache,
                )
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (batch,)
            tokens[:, end] = nxt
            end += 1
            if stops:
                finished |= torch.isin(nxt, stop_tensor)
                if bool(finished.all()):
                    break
    if was_training:
        model.train()

    out = []
    for row in tokens[:, width:end].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in stops), len(row))
        out.append(row[:cut])
    return out
