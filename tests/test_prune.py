"""common.prune: magnitude masks against torch.nn.utils.prune, and physically removed heads and neurons
against the same model with them zeroed."""

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
    neuron_scores,
    prune_model,
    sparsity_of,
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
