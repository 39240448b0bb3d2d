"""KV-cache generation: exactly the tokens of full recomputation, batched (left-padded) prompts equal to
one at a time, greedy equal to transformers' ``generate`` (do_sample=False) on the same weights,
top-k / top-p filtering equal to transformers' logits warpers, temperature sampling following the
softmax, stop tokens, and the errors."""

import pytest
import torch

from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import filter_logits, generate, sample_next
from common.models.hf_llama import decoder_to_hf

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [3]]


def model_for(**kw) -> DecoderLM:
    torch.manual_seed(0)
    base = dict(vocab_size=97, context_length=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    model = DecoderLM(DecoderConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # large random weights give varied, non-repeating greedy continuations
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


VARIANTS = [
    dict(),
    dict(n_kv_head=1, qk_norm=True),
    dict(pos="learned", norm="layernorm"),
    dict(norm_placement="post", ffn="gelu"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=["gqa-rope", "mqa-qknorm", "learned-pos", "post-norm"])
def test_kv_cache_gives_the_tokens_of_full_recomputation(kw):
    model = model_for(**kw)
    for prompts in ([PROMPTS[0]], PROMPTS):  # one prompt; several of different lengths
        cached = generate(model, prompts, 24)
        assert cached == generate(model, prompts, 24, use_cache=False)
        assert all(len(row) == 24 for row in cached)
    assert len({tuple(r) for r in cached}) > 1  # the prompts really lead to different continuations


@pytest.mark.parametrize("kw", VARIANTS[:3], ids=["gqa-rope", "mqa-qknorm", "learned-pos"])
def test_batched_prompts_with_padding_equal_one_at_a_time(kw):
    model = model_for(**kw)
    batched = generate(model, PROMPTS, 16, pad_id=0)
    assert batched == [generate(model, [p], 16)[0] for p in PROMPTS]
    assert batched == generate(model, PROMPTS, 16, pad_id=96)  # the pad id does not leak in


def test_cached_logits_equal_full_forward():
    model = model_for()
    idx = torch.randint(0, 97, (2, 12))
    full, _ = model(idx)
    cache = model.new_kv_cache(2, 12)
    steps = [model(idx[:, :7], kv_cache=cache)[0]] + [
        model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(7, 12)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 12


def test_greedy_matches_hf_generate():
    model = model_for(n_kv_head=2)
    hf = decoder_to_hf(model)
    for p in PROMPTS[:2]:
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert ref[0, len(p) :].tolist() == generate(model, [p], 20)[0]
    # a left-padded batch, as transformers does it (attention_mask zeros on the left)
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ref[:, width:].tolist() == generate(model, PROMPTS, 12)


def test_top_k_and_top_p_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for k in (1, 5, 50):
        assert torch.equal(filter_logits(logits, top_k=k), TopKLogitsWarper(k)(None, logits))
    for p in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(filter_logits(logits, top_p=p), TopPLogitsWarper(p)(None, logits))
    both = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, logits))
    assert torch.equal(filter_logits(logits, top_k=10, top_p=0.8), both)


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (0.5, 1.0, 2.0):
        counts = torch.bincount(sample_next(logits, temperature, generator=g), minlength=4).float()
        expected = (logits[0] / temperature).softmax(-1)
        torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)
    assert torch.equal(sample_next(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))  # greedy
    assert torch.equal(sample_next(logits[:3], 1.0, top_k=1, generator=g), torch.zeros(3, dtype=torch.long))


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = model_for()
    a = generate(model, PROMPTS, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, PROMPTS, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a == b and a != generate(model, PROMPTS, 20)
    top5 = torch.topk(model(torch.tensor([PROMPTS[0]]))[0][0, -1], 5).indices.tolist()
    assert a[0][0] in top5


def test_stop_tokens_cut_each_row_and_end_generation_early():
    model = model_for()
    free = generate(model, PROMPTS, 20)
    stop = free[0][3]
    cut = generate(model, PROMPTS, 20, stop_tokens=stop)
    for row_free, row_cut in zip(free, cut):
        expected = row_free[: row_free.index(stop)] if stop in row_free else row_free
        assert row_cut == expected
    assert generate(model, [PROMPTS[0]], 20, stop_tokens=[free[0][0], 1000]) == [[]]


def test_generate_rejects_bad_requests():
    model = model_for()
    with pytest.raises(ValueError, match="exceed the context of 64"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 200]], 2)


def _snapshot(model) -> dict:
    """Every parameter: the object, its storage, strides and values."""
    return {n: (p, p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()}


def _assert_untouched(model, before: dict) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, ptr, stride, values) in before.items():
        q = after[n]
        assert q is p and q.data_ptr() == ptr and q.stride() == stride, n
        assert torch.equal(q, values) and not q.is_inference(), n


@pytest.mark.parametrize("new_tokens", [1, 64])
def test_generate_leaves_every_parameter_untouched(new_tokens):
    model = model_for(tie_embeddings=True, context_length=96)
    model.train()
    before = _snapshot(model)
    generate(model, PROMPTS, new_tokens)  # batched, cached
    generate(model, [PROMPTS[0]], new_tokens, temperature=1.0, top_k=5)  # sampled
    generate(model, [PROMPTS[0]], new_tokens, use_cache=False)  # recomputed
    _assert_untouched(model, before)
    assert model.training  # the caller's mode comes back
    _, loss = model(torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[0]]))
    loss.backward()  # still an ordinary, trainable model
    assert model.lm_head.weight.grad is not None


def test_moe_lm_generates_the_tokens_of_recomputation_and_leaves_its_experts_untouched():
    from common.moe import TopKMoE

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=97, context_length=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    model = DecoderLM(config, ffn_factory=lambda i, c: TopKMoE(c.d_model, 24, 8, k=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    before = _snapshot(model)
    cached = generate(model, PROMPTS, 24)
    assert cached == generate(model, PROMPTS, 24, use_cache=False)
    _assert_untouched(model, before)
