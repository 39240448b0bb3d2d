"""Each MoE layer/router equals the reference that defines its convention (fp32, weights copied).

* TopKMoE vs transformers' MixtralSparseMoeBlock (output, router logits) and its balance loss;
* SwitchMoE vs transformers' SwitchTransformersSparseMLP / Top1Router (expert index, probabilities,
  capacity mask, output) and its balance loss / z-loss functions;
* DeepSeekMoE vs transformers' DeepseekV3MoE (groups, shared experts, correction bias), and vs the MoE
  block of a DeepseekV32ForCausalLM built normally: the part of DeepSeek-V3.2 this code reproduces;
* Switch and GShard balance losses (and GShard's capacity and weights) vs DeepSpeed's
  top1gating / top2gating on the same logits.
"""

import pytest
import torch
import torch.nn.functional as F

from common.moe import DeepSeekMoE, GShardMoE, SwitchMoE, TopKMoE, balance_loss

ATOL = 1e-5


def _randomize(module, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# ----------------------------------------------------------------------------- Mixtral


def _mixtral_block(d=32, d_ff=48, experts=8, k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=d_ff,
        num_local_experts=experts,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = "eager"
    return _randomize(MixtralSparseMoeBlock(cfg)).eval()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_moe_matches_mixtral_block(k):
    block = _mixtral_block(k=k)
    ours = TopKMoE.from_hf(block).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ref = block(x.clone())
        ref_logits = block.gate(x.reshape(-1, 32))[0]
        out, aux = ours(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.last_routing.logits, ref_logits, atol=ATOL, rtol=0)
    assert float(aux) == 0.0  # no auxiliary loss in eval mode


def test_topk_balance_loss_is_mixtral_over_k():
    """HF Mixtral's f_e divides top-k counts by tokens (sums to k); ours by slots (sums to 1)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    block = _mixtral_block(k=2)
    ours = TopKMoE.from_hf(block).train()
    x = torch.randn(2, 9, 32)
    _, aux = ours(x)
    logits = ours.last_routing.logits
    hf = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(ours.last_losses["balance"] * 2, hf, atol=ATOL, rtol=0)
    torch.testing.assert_close(aux, 0.01 * ours.last_losses["balance"], atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- Switch


def _switch_mlp(capacity, experts=8, d=32, d_ff=48, act="relu"):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    cfg = SwitchTransformersConfig(
        d_model=d,
        d_ff=d_ff,
        num_experts=experts,
        expert_capacity=capacity,
        router_jitter_noise=0.0,
        dense_act_fn=act,
        router_bias=False,
    )
    return _randomize(SwitchTransformersSparseMLP(cfg)).eval()


@pytest.mark.parametrize("capacity", [1, 2, 64])
def test_switch_router_matches_hf(capacity):
    mlp = _switch_mlp(capacity)
    ours = SwitchMoE.from_hf(mlp).eval()
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        expert_index, router_probs, router_logits = mlp.router(x.clone())
        ref = mlp(x.clone())
        out, _ = ours(x)
    r = ours.last_routing
    ours_mask = F.one_hot(r.expert_idx[:, 0], 8) * r.keep  # capacity-masked one-hot
    assert torch.equal(ours_mask.view(2, 13, 8), expert_index)
    torch.testing.assert_close(r.logits.view(2, 13, 8), router_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(r.logits.softmax(-1).max(-1).values, router_probs.view(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(r.weights[:, 0], router_probs.view(-1) * r.keep[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if capacity == 1:
        assert ours.last_stats.dropped_fraction > 0


def test_switch_losses_match_hf_functions():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
        router_z_loss_func,
    )

    ours = SwitchMoE.from_hf(_switch_mlp(4), jitter=0.0).train()
    ours(torch.randn(1, 24, 32))
    logits = ours.last_routing.logits
    probs = logits.softmax(-1)
    hf_bal = load_balancing_loss_func(probs[None], probs.argmax(-1)[None])
    torch.testing.assert_close(ours.last_losses["balance"], hf_bal, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.last_losses["z"], router_z_loss_func(logits[None]), atol=ATOL, rtol=0)


def test_switch_passthrough_outputs_input_for_dropped_tokens():
    ours = SwitchMoE.from_hf(_switch_mlp(1), dropped="passthrough").eval()
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        out, _ = ours(x)
    dropped = ~ours.last_routing.keep[:, 0]
    assert dropped.any()
    torch.testing.assert_close(out[0, dropped], x[0, dropped])


# ----------------------------------------------------------------------------- DeepSeek-V3


def _deepseek_moe(n_group, topk_group, n_shared=1, norm=True, experts=16, k=4):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        n_shared_experts=n_shared,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )
    cfg._experts_implementation = "eager"
    moe = _randomize(DeepseekV3MoE(cfg)).eval()
    with torch.no_grad():  # a bias big enough to change choices, negative too
        moe.gate.e_score_correction_bias.copy_(torch.randn(experts) * 0.5)
    return moe


@pytest.mark.parametrize(
    "n_group,topk_group,n_shared,norm", [(1, 1, 1, True), (4, 2, 1, True), (8, 3, 2, False), (4, 1, 1, True)]
)
def test_deepseek_moe_matches_hf(n_group, topk_group, n_shared, norm):
    moe = _deepseek_moe(n_group, topk_group, n_shared, norm)
    ours = DeepSeekMoE.from_hf(moe).eval()
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        ref = moe(x.clone())
        ref_logits, ref_w, ref_i = moe.gate(x.clone())
        out, _ = ours(x)
    r = ours.last_routing
    torch.testing.assert_close(r.logits, ref_logits, atol=ATOL, rtol=0)
    # same experts with the same weights (slot order may differ: transformers' topk is unsorted)
    ours_dense = torch.zeros(22, 16).scatter_add(1, r.expert_idx, r.weights)
    ref_dense = torch.zeros(22, 16).scatter_add(1, ref_i, ref_w)
    torch.testing.assert_close(ours_dense, ref_dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_deepseek_group_limit_keeps_choices_inside_topk_groups():
    ours = DeepSeekMoE.from_hf(_deepseek_moe(4, 2)).eval()
    with torch.no_grad():
        ours(torch.randn(4, 16, 32))
    groups_used = (ours.last_routing.expert_idx // 4).sort(-1).values
    n_distinct = (groups_used[:, 1:] != groups_used[:, :-1]).sum(-1) + 1
    assert int(n_distinct.max()) <= 2


def test_of_deepseek_v32_only_the_moe_block_is_reproduced():
    """DeepSeek-V3.2's MoE block is V3's, and ours equals it (on transformers' default grouped_mm experts);
    its attention is multi-head latent attention (low-rank q and kv projections) with the sparse-attention
    indexer, which the book's decoder (one fused qkv projection, dense causal attention) does not have."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from common.models.decoder import DecoderConfig, DecoderLM

    cfg = DeepseekV32Config(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=0,
        num_hidden_layers=1,
        vocab_size=11,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
    )
    layer = DeepseekV32ForCausalLM(cfg).eval().model.layers[0]
    _randomize(layer.mlp)
    ours = DeepSeekMoE.from_hf(layer.mlp).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out, _ = ours(x)
        torch.testing.assert_close(out, layer.mlp(x), atol=ATOL, rtol=0)
    v32_attention = {name for name, _ in layer.self_attn.named_children()}
    assert {"q_a_proj", "kv_a_proj_with_mqa", "indexer"} <= v32_attention  # MLA and the DSA indexer
    ours_attention = DecoderLM(DecoderConfig(vocab_size=11, n_layer=1, d_model=32, n_head=4)).blocks[0].attn
    assert {name for name, _ in ours_attention.named_children()} <= {
        "qkv",
        "proj",
        "q_norm",
        "k_norm",
        "resid_dropout",
    }


# ----------------------------------------------------------------------------- DeepSpeed gating


@pytest.fixture(scope="module")
def sharded_moe():
    from common.env import require

    require("deepspeed")
    from deepspeed.moe import sharded_moe

    return sharded_moe


def test_switch_balance_loss_matches_deepspeed_top1gating(sharded_moe):
    layer = SwitchMoE(32, 48, 8, capacity_factor=1.0, jitter=0.0).train()
    layer(torch.randn(4, 16, 32))
    logits = layer.last_routing.logits.detach()
    l_aux, _, _, exp_counts = sharded_moe.top1gating(
        logits.clone(), capacity_factor=1.0, min_capacity=0, use_rts=False
    )
    torch.testing.assert_close(layer.last_losses["balance"], l_aux, atol=ATOL, rtol=0)
    assert torch.equal(torch.bincount(layer.last_routing.expert_idx[:, 0], minlength=8), exp_counts)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_gshard_matches_deepspeed_top2gating(sharded_moe, capacity_factor):
    """Balance loss, capacity drops (firsts before seconds) and renormalised weights, random routing off."""
    layer = GShardMoE(32, 48, 8, capacity_factor=capacity_factor, random_routing=False).train()
    layer(torch.randn(4, 16, 32))
    r = layer.last_routing
    logits = r.logits.detach()
    l_aux, combine, dispatch_mask, _ = sharded_moe.top2gating(
        logits.clone(), capacity_factor=capacity_factor, min_capacity=0, top2_2nd_expert_sampling=False
    )
    torch.testing.assert_close(layer.last_losses["balance"], l_aux, atol=ATOL, rtol=0)
    ours_dense = torch.zeros(64, 8).scatter_add(1, r.expert_idx, r.weights)  # (tokens, E)
    torch.testing.assert_close(ours_dense, combine.sum(-1), atol=ATOL, rtol=0)
    assert torch.equal(
        torch.zeros(64, 8, dtype=torch.bool).scatter(1, r.expert_idx, r.keep), dispatch_mask.any(-1)
    )
    if capacity_factor < 1:
        assert layer.last_stats.dropped_fraction > 0


def test_balance_loss_function_against_deepspeed_top2(sharded_moe):
    logits = torch.randn(50, 6)
    l_aux = sharded_moe.top2gating(logits.clone(), 1.0, 0, top2_2nd_expert_sampling=False)[0]
    ours = balance_loss(logits.softmax(-1), logits.argmax(-1, keepdim=True))
    torch.testing.assert_close(ours, l_aux, atol=ATOL, rtol=0)
