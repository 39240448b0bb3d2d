"""common.prune: magnitude masks against torch.nn.utils.prune, Wanda's score and 2:4 masks against
hand computations, and physically removed heads and neurons against the same model with them zeroed."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate
from common.prune import (
    activation_scores,
    apply_masks,
    global_magnitude_masks,
    head_scores,
    layer_magnitude_masks,
    linear_weights,
    lowest,
    lowest_per_layer,
    magnitude_n_m_masks,
    magnitude_scores,
    n_m_mask,
    neuron_scores,
    prune_model,
    row_masks,
    sparsity_of,
    wanda_prune,
    wanda_scores,
    zero_units,
)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, context_length=32, n_layer=3, d_model=48, n_head=4, n_kv_head=4, d_ff=40)
    return DecoderLM(DecoderConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_global_masks_match_torch_prune(sparsity):
    model = tiny()
    weights = linear_weights(model)
    masks = global_magnitude_masks(weights, sparsity)
    ref = tiny()
    modules = [(m, "weight") for m in ref.modules() if isinstance(m, nn.Linear) and m is not ref.lm_head]
    torch_prune.global_unstructured(modules, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    for (m, _), (name, mask) in zip(modules, masks.items()):
        assert torch.equal(m.weight_mask.bool(), mask), name
    apply_masks(model, masks)
    assert sparsity_of(weights.values()) == pytest.approx(sparsity, abs=1e-3)


def test_layer_masks_match_torch_prune():
    model = tiny()
    masks = layer_magnitude_masks(linear_weights(model), 0.5)
    for name, w in linear_weights(tiny()).items():
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        torch_prune.l1_unstructured(lin, "weight", amount=0.5)
        assert torch.equal(lin.weight_mask.bool(), masks[name])


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        global_magnitude_masks(linear_weights(tiny()), sparsity)


@pytest.mark.parametrize(
    "kw", [dict(), dict(ffn="gelu", bias=True), dict(n_kv_head=2), dict(ffn="relu2", n_kv_head=1)]
)
def test_pruned_model_equals_zeroed(kw):
    model = tiny(**kw)
    units = model.blocks[0].attn.n_kv_head
    heads = {0: [0], 2: list(range(units - 1))} if units > 1 else {}
    neurons = {0: [1, 5, 7], 1: list(range(20))}
    small = prune_model(model, heads, neurons)
    ref = zero_units(model, heads, neurons)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        got, want = small(x)[0], ref(x)[0]
    assert (got - want).abs().max() < 1e-5
    # the cache is sized per layer, so cached generation gives the recomputed tokens
    cached = generate(small, [[1, 2, 3]], 8)
    assert cached == generate(small, [[1, 2, 3]], 8, use_cache=False)
    assert small.shape_summary()["d_ff"] == [37, 20, 40]


def test_scores_and_selection():
    model = tiny()
    hs, ns = head_scores(model), neuron_scores(model)
    assert hs.shape == (3, 4) and [n.shape[0] for n in ns] == [40, 40, 40]
    picked = lowest(hs, 3)
    assert sum(len(v) for v in picked.values()) == 3
    assert all(len(v) == 20 for v in lowest_per_layer(ns, 0.5).values())
    ah, an = activation_scores(model, [torch.randint(0, 97, (2, 16))])
    assert ah.shape == hs.shape and (ah > 0).all() and an[0].shape == (40,)
    # removing a neuron with no output weight changes nothing, so its activation score is zero
    with torch.no_grad():
        model.blocks[1].ffn.down.weight[:, 3] = 0
    _, an = activation_scores(model, [torch.randint(0, 97, (2, 16))])
    assert an[1][3] == 0 and an[1].argmin() == 3


def test_no_heads_left_is_an_error():
    with pytest.raises(ValueError, match="would leave none"):
        prune_model(tiny(), heads={1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="would leave none"):
        prune_model(tiny(), neurons={0: list(range(40))})
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        prune_model(tiny(), heads={7: [0]})


def test_two_four_mask_keeps_the_two_largest_of_every_four():
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    mask = n_m_mask(magnitude_scores(w), 2, 4)
    groups = mask.reshape(6, 4, 4)
    assert (groups.sum(dim=2) == 2).all()
    kept = (w * mask).reshape(6, 4, 4)
    assert ((kept != 0).sum(dim=2) == 2).all()
    # the two kept are the two largest |w| of their group
    top2 = w.abs().reshape(6, 4, 4).sort(dim=2, descending=True).values[..., :2]
    assert torch.equal(kept.abs().sort(dim=2, descending=True).values[..., :2], top2)
    masks = magnitude_n_m_masks(linear_weights(tiny()))
    assert all(float(m.float().mean()) == 0.5 for m in masks.values())


def test_two_four_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        n_m_mask(torch.rand(3, 6))
    model = tiny(d_model=50, n_head=5, n_kv_head=5)
    with pytest.raises(ValueError, match="divisible by 4; blocks.0.attn.qkv has 50"):
        wanda_prune(model, torch.randint(0, 97, (2, 8)), n_m=(2, 4))


def test_wanda_score_by_hand():
    torch.manual_seed(2)
    w, x = torch.randn(3, 5), torch.randn(7, 5)
    want = torch.empty(3, 5)
    for i in range(3):
        for j in range(5):
            want[i, j] = abs(float(w[i, j])) * sum(float(x[t, j]) ** 2 for t in range(7)) ** 0.5
    assert torch.allclose(wanda_scores(w, x.norm(dim=0)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="input_norm must have shape"):
        wanda_scores(w, torch.ones(4))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_wanda_with_uniform_norms_is_magnitude_per_row(sparsity):
    torch.manual_seed(3)
    w = torch.randn(8, 20)
    wanda = row_masks(wanda_scores(w, torch.full((20,), 3.7)), sparsity)
    assert torch.equal(wanda, row_masks(magnitude_scores(w), sparsity))
    assert (wanda.sum(dim=1) == 20 - round(sparsity * 20)).all()
    for i in range(8):  # each row as torch.nn.utils.prune prunes a one-row layer by L1
        lin = nn.Linear(20, 1, bias=False)
        lin.weight.data.copy_(w[i : i + 1])
        torch_prune.l1_unstructured(lin, "weight", amount=sparsity)
        assert torch.equal(lin.weight_mask.bool()[0], wanda[i])
    assert torch.equal(n_m_mask(wanda_scores(w, torch.ones(20))), n_m_mask(magnitude_scores(w)))


def test_wanda_prune_on_a_model():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 97, (4, 16))
    pruned, masks = wanda_prune(model, windows, 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched
    assert set(masks) == set(linear_weights(model))
    for name, mask in masks.items():
        assert (mask.sum(dim=1) == mask.shape[1] // 2).all(), name
    # the first block's inputs are the model's own: its masks follow from the scores by hand
    seen = {}
    hook = model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(windows)
    hook.remove()
    scores = model.blocks[0].attn.qkv.weight.abs() * seen["x"].reshape(-1, 48).norm(dim=0)
    assert torch.equal(masks["blocks.0.attn.qkv.weight"], row_masks(scores, 0.5))
    # the pruned copy is the original with the masks applied
    ref = tiny()
    apply_masks(ref, masks)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.allclose(pruned(x)[0], ref(x)[0], atol=1e-6)
    _, masks24 = wanda_prune(model, windows, n_m=(2, 4))
    assert all((m.reshape(m.shape[0], -1, 4).sum(dim=2) == 2).all() for m in masks24.values())
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        wanda_prune(model, windows, 1.0)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2)])
def test_pruned_and_quantised_model_saves_and_loads_back(kw, tmp_path):
    from common.quant import load_quantized, pack_model, rtn_model, save_quantized

    model = tiny(**kw)
    units = model.blocks[0].attn.n_kv_head
    small = prune_model(model, {1: list(range(units // 2))}, {0: list(range(8)), 2: list(range(24))})
    fake, qweights = rtn_model(small, 4, 8)
    packed = pack_model(fake, qweights).eval()
    save_quantized(packed, tmp_path, {"method": "rtn", "bits": 4, "group_size": 8})
    loaded, config = load_quantized(tmp_path)
    assert config["layer_shapes"] == small.shape_summary() == loaded.shape_summary()
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], packed(x)[0])
