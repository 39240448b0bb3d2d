"""Fused (chunked) linear + cross-entropy: the LM loss without materialising the logits.

The last step of a language model, ``F.cross_entropy(h @ W.T, y)``, is cheap in FLOPs next to the
blocks but expensive in memory traffic: the (tokens, vocab) logits are written, read by log-softmax,
written again, and in the backward pass a zero-filled gradient of the same size is written, read and
written again. With a vocabulary of 8192 and 2048 tokens that is 64 MiB per pass; on a machine with
little memory bandwidth those passes cost as much as several matrix multiplies.

The fused version (as in Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut Cross-Entropy) walks
the tokens in chunks small enough for the chunk's logits to stay in cache. For each chunk it computes
the logits, their log-sum-exp and the target logit (the loss), and right away the gradient of the
logits, ``(softmax - one_hot) / n_valid``, which it turns into the gradients of the hidden states
(``grad_logits @ W``) and of the weight (``grad_logits.T @ h``, accumulated over chunks). The backward
pass only scales those stored gradients by the incoming gradient (1 for a plain ``loss.backward()``).

:class:`~common.models.decoder.DecoderLM` uses it when asked, ``model(idx, targets, fused_loss=True)``;
by default it computes the logits and ``F.cross_entropy`` over them, which is as fast or faster on a
CPU (``benchmarks.bench_decoder``'s loss-head table): the fused head's point is the memory it saves
at large vocabularies.

Conventions are those of ``F.cross_entropy(F.linear(h, W), y, ignore_index=-100)``: the mean over
the targets that are not ``ignore_index`` (NaN when there are none). Under autocast the matrix
multiplies run in the autocast dtype, as they would in ``F.linear``, and the softmax math in fp32.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Logit elements per chunk (64 MiB in fp32): 2048 tokens at a vocabulary of 8192. Measured with
# ``python -m benchmarks.bench_decoder`` (its loss-head table): on a 2-core CPU smaller chunks are slower,
# because the matrix multiplies with few rows run far below peak; on a GPU this bounds the memory.
LOGITS_PER_CHUNK = 2**24


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ weight.T, targets); gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size, ignore_index, needs_grad):
        # h: (tokens, d_model), weight: (vocab, d_model), targets: (tokens,)
        device_type = h.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        )
        valid = targets != ignore_index  # (tokens,)
        n_valid = valid.sum()
        # each valid row's gradient carries the factor 1/n_valid of the mean, each ignored row 0 (with no
        # valid target at all the loss is 0/0 = NaN and the gradients are zero, as in F.cross_entropy)
        row_scale = valid / n_valid.clamp(min=1)  # (tokens,) fp32
        safe_targets = torch.where(valid, targets, 0)  # ignored rows gather a dummy column
        loss_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty(h.shape, device=h.device, dtype=torch.float32) if needs_grad else None
        grad_w = None  # (vocab, d_model) fp32, summed over the chunks
        w = weight.to(compute_dtype)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                end = min(start + chunk_size, h.shape[0])
                h_c, y_c = h[start:end].to(compute_dtype), safe_targets[start:end]  # (chunk, d), (chunk,)
                logp = torch.log_softmax((h_c @ w.T).float(), dim=-1)  # (chunk, vocab)
                nll = -logp.gather(1, y_c[:, None]).squeeze(1)  # (chunk,)
                loss_sum += torch.where(valid[start:end], nll, 0.0).sum()
                if not needs_grad:
                    continue
                # d loss / d logits = (softmax - one_hot) * row_scale; the row scale is applied on the
                # narrow (chunk, d_model) side of each product instead of to the (chunk, vocab) tensor
                grad_logits = logp.exp_()  # softmax, in place
                grad_logits[torch.arange(end - start, device=h.device), y_c] -= 1.0
                g = grad_logits.to(compute_dtype)
                scale = row_scale[start:end, None]  # (chunk, 1)
                grad_h[start:end] = (g @ w).float() * scale
                h_scaled = (h_c.float() * scale).to(compute_dtype)
                if grad_w is None:
                    grad_w = (g.T @ h_scaled).float()
                elif compute_dtype == torch.float32:
                    grad_w.addmm_(g.T, h_scaled)  # in place, no (vocab, d_model) temporary
                else:  # accumulate the low-precision products in fp32
                    grad_w += (g.T @ h_scaled).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("linear_cross_entropy was called without gradients; cannot backward")
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight), targets, ignore_index=ignore_index)``, chunked.

    h: (..., d_model) hidden states, weight: (vocab, d_model), targets: (...) class ids with the
    leading shape of ``h``; chunk_size: tokens per chunk (default: ``LOGITS_PER_CHUNK // vocab``).
    Returns the mean loss over the non-ignored targets, in fp32.
    """
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"h (..., d_model) and weight (vocab, d_model) disagree: "
            f"{tuple(h.shape)} vs {tuple(weight.shape)}"
        )
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(h.shape[:-1])}, got {tuple(targets.shape)}")
    if chunk_size is None:
        chunk_size = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    h2, y = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (tokens, d_model), (tokens,)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h2, weight, y, chunk_size, ignore_index, needs_grad)
