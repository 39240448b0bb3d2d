"""The fused (chunked) linear + cross-entropy against ``F.cross_entropy(F.linear(h, W), y,
ignore_index=-100)`` and torch's own ``F.linear_cross_entropy``: loss and gradients of the hidden states
and of the weight, uneven chunks, ignored rows, tied embeddings through DecoderLM, autocast. fp32, 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from common.models.decoder import DecoderConfig, DecoderLM
from common.models.fused_cross_entropy import linear_cross_entropy

ATOL = 1e-5


def _inputs(tokens: int, d: int = 24, vocab: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, d, generator=g).requires_grad_()
    w = torch.randn(vocab, d, generator=g).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, y


def _reference(h, w, y, grad_scale: float = 1.0):
    """Loss and gradients of the plain, unfused computation."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), y, ignore_index=-100)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize(
    "tokens, chunk, ignored",
    [(37, 8, [3, 4, 5, 36]), (40, 16, list(range(16, 32))), (37, 100, [0]), (64, 64, [])],
    ids=["uneven-chunks", "a-chunk-all-ignored", "chunk-larger-than-tokens", "one-exact-chunk"],
)
def test_loss_and_grads_equal_unfused_cross_entropy(tokens, chunk, ignored):
    h, w, y = _inputs(tokens)
    y[ignored] = -100
    ref_loss, ref_gh, ref_gw = _reference(h, w, y, grad_scale=3.0)
    loss = linear_cross_entropy(h, w, y, chunk_size=chunk)
    (loss * 3.0).backward()  # the incoming gradient scales the precomputed ones
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), ref_loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(h.grad, ref_gh, atol=ATOL, rtol=0)
    torch.testing.assert_close(w.grad, ref_gw, atol=ATOL, rtol=0)
    assert h.grad[ignored].abs().sum() == 0 if ignored else True  # ignored rows get no gradient


def test_batched_hidden_states_and_torch_linear_cross_entropy():
    """(batch, seq, d) inputs; torch's own chunked implementation agrees too."""
    h, w, y = _inputs(2 * 13, d=16, vocab=70, seed=1)
    y[5:9] = -100
    h3 = h.detach().view(2, 13, 16).requires_grad_()
    loss = linear_cross_entropy(h3, w, y.view(2, 13), chunk_size=5)
    loss.backward()
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("this torch has no F.linear_cross_entropy (added in 2.12)")
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear_cross_entropy(
        h_ref, w_ref, y, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions()
    )
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(h3.grad.view(-1, 16), h_ref.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=ATOL, rtol=0)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads_like_torch():
    h, w, y = _inputs(9)
    y[:] = -100
    ref_loss, ref_gh, ref_gw = _reference(h, w, y)
    loss = linear_cross_entropy(h, w, y, chunk_size=4)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    torch.testing.assert_close(h.grad, ref_gh, atol=0, rtol=0)
    torch.testing.assert_close(w.grad, ref_gw, atol=0, rtol=0)


def test_without_grad_only_the_loss_is_computed():
    h, w, y = _inputs(30)
    ref_loss, _, _ = _reference(h, w, y)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, chunk_size=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_decoder_loss_and_every_grad_equal_unfused_logits(tie):
    """DecoderLM(idx, targets, fused_loss=True) vs the cross-entropy of its full logits (and the model's
    default, plain loss): the tied weight gets both the embedding's and the head's gradient."""
    cfg = DecoderConfig(vocab_size=97, context_length=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    torch.manual_seed(0)
    model = DecoderLM(cfg.replace(tie_embeddings=tie))
    ref = DecoderLM(cfg.replace(tie_embeddings=tie))
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    targets[1] = -100  # a whole row ignored
    logits, loss = model(idx, targets, fused_loss=True)
    assert logits is None  # the fused loss never builds the logits
    loss.backward()
    ref_logits, _ = ref(idx)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=ATOL, rtol=1e-4, msg=name)
    plain_logits, plain_loss = model(idx, targets)  # the default: logits and F.cross_entropy over them
    torch.testing.assert_close(plain_logits, ref_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain_loss, ref_loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_autocast_bf16_matches_autocast_reference(device):
    """Under bf16 autocast the matmuls run in bf16 and the softmax in fp32, as the unfused path does."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    h, w, y = _inputs(64, d=32, vocab=300, seed=2)
    h, w = h.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_()
    y = y.to(device)
    y[:7] = -100
    h_ref, w_ref = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_size=24)
        ref = F.cross_entropy(F.linear(h_ref, w_ref).float(), y, ignore_index=-100)
    loss.backward()
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    # bf16 has 8 bits of mantissa: compare gradients relative to their size
    for g, g_ref in ((h.grad, h_ref.grad), (w.grad, w_ref.grad)):
        assert (g - g_ref).norm() <= 2e-2 * g_ref.norm()


def test_bad_inputs_raise_clear_errors():
    h, w, y = _inputs(10)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, y[:4])
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    model = DecoderLM(
        DecoderConfig(vocab_size=50, context_length=16, n_layer=1, d_model=16, n_head=2, n_kv_head=2)
    )
    with pytest.raises(ValueError, match="cannot take targets"):
        model(y[:8].clamp(min=0)[None], y[:8][None], last_only=True)
