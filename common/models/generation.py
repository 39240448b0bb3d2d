"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, and
batched prompts of different lengths.

Prompts are LEFT-padded to a common length so that every row's next token lands in the same column.
Padding is hidden by an attention mask, and each row counts its positions from its own first real
token, so a padded prompt sees exactly the positions (and RoPE angles) it would see alone.

The cache is preallocated for prompt + new tokens, so each step writes one column in place: after the
prompt's single forward pass (the "prefill"), every step runs the model on one token per row.

Generation only reads the model: its parameters keep their storage, layout and values (a decoding
step is a chain of matrix-vector products, whose time is the time to stream every weight matrix from
memory once; ``benchmarks.bench_decoder`` compares it with transformers' ``generate``). The opt-in
:class:`common.models.decode_layout.DecodeLayout` passes for a model here: it runs the same forward
over column-major copies of the matrices, held apart, which torch's matrix-vector product reads faster.
"""

from __future__ import annotations

import torch

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


def decode_room_problem(prompts: list[list[int]], new_tokens: int, context: int) -> str | None:
    """Why ``new_tokens`` after the longest of ``prompts`` do not fit in ``context`` tokens, or None
    (the check a script makes on its flags before the work, and :func:`generate` before decoding)."""
    longest = max(map(len, prompts), default=0)
    if longest + new_tokens > context:
        room = f"the context of {context}"
        return f"the longest prompt ({longest} tokens) and {new_tokens} new tokens exceed {room}"
    return None


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
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Returns the new tokens of each prompt, cut before its first stop token (``stop_tokens``: an id or a
    collection of ids). ``use_cache=False`` recomputes the whole sequence every step (the slow reference).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ctx = model.config.context_length
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    problem = decode_room_problem(prompts, max_new_tokens, ctx)
    if problem:
        raise ValueError(problem)
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
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_tensor = torch.tensor(sorted(stops), dtype=torch.long, device=device)
    end = width
    try:
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
    finally:  # the caller's mode back, even if a step raises
        if was_training:
            model.train()

    out = []
    for row in tokens[:, width:end].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in stops), len(row))
        out.append(row[:cut])
    return out
