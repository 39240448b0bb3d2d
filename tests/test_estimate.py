"""The estimators of common/estimate.py against transformers' models on the meta device, our own
DecoderLM, hand-computed small cases and published figures."""

import json

import pytest
import torch

from common import estimate
from common.estimate import count_params, flops_per_token, model_shape, training_flops
from common.models.decoder import DecoderConfig, DecoderLM


def meta_numel(module_factory) -> int:
    with torch.device("meta"):
        model = module_factory()
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def hf_numel(config) -> int:
    from transformers import AutoModelForCausalLM

    return meta_numel(lambda: AutoModelForCausalLM.from_config(config))


def tiny_configs():
    """Small configs of every supported family, tied and untied, with and without biases."""
    import transformers as tf

    small = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
    heads = dict(num_attention_heads=8, num_key_value_heads=2)
    yield "llama", tf.LlamaConfig(**small, **heads)
    yield (
        "llama-tied-bias",
        tf.LlamaConfig(**small, **heads, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    )
    yield "llama-head_dim", tf.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=4, head_dim=24)
    yield "mistral", tf.MistralConfig(**small, **heads)
    yield "qwen2", tf.Qwen2Config(**small, **heads)
    yield "qwen2-tied", tf.Qwen2Config(**small, **heads, tie_word_embeddings=True)
    yield "mixtral", tf.MixtralConfig(**small, **heads, num_local_experts=4, num_experts_per_tok=2)
    ds = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=2,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
    )
    yield "deepseek_v3", tf.DeepseekV3Config(**ds)
    yield (
        "deepseek_v3-noqlora-bias-tied",
        tf.DeepseekV3Config(
            **{**ds, "q_lora_rank": None, "attention_bias": True, "tie_word_embeddings": True}
        ),
    )
    yield "deepseek_v3-all-dense", tf.DeepseekV3Config(**{**ds, "first_k_dense_replace": 4})
    yield "gpt2", tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    yield (
        "gpt2-untied-n_inner",
        tf.GPT2Config(
            vocab_size=97,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            n_inner=80,
            tie_word_embeddings=False,
        ),
    )


@pytest.mark.parametrize("name,config", list(tiny_configs()), ids=[n for n, _ in tiny_configs()])
def test_count_params_equals_transformers_on_meta(name, config):
    p = count_params(config)
    assert p["total"] == hf_numel(config), name
    assert p["total"] == p["embedding"] + p["lm_head"] + p["attention"] + p["mlp"] + p["norm"]
    assert p["mlp"] == p["dense_mlp"] + p["router"] + p["experts"] + p["shared_experts"]
    assert p["active"] <= p["total"]


def test_count_params_parts_against_named_modules():
    """Each part equals the parameters under the transformers modules of that name."""
    import transformers as tf

    config = dict(tiny_configs())["deepseek_v3"]
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    parts = {"attention": 0, "mlp": 0, "norm": 0, "embedding": 0, "lm_head": 0}
    for name, t in model.named_parameters():
        if "norm" in name:
            parts["norm"] += t.numel()
        elif ".self_attn." in name:
            parts["attention"] += t.numel()
        elif ".mlp." in name:
            parts["mlp"] += t.numel()
        elif "embed_tokens" in name:
            parts["embedding"] += t.numel()
        else:
            parts["lm_head"] += t.numel()
    p = count_params(config)
    assert {k: p[k] for k in parts} == parts


def test_active_params_of_moe_by_hand():
    import transformers as tf

    c = tf.MixtralConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    p = count_params(c)
    assert p["expert_size"] == 3 * 64 * 96
    assert p["total"] - p["active"] == 3 * (4 - 2) * 3 * 64 * 96


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(tie_embeddings=True),
        dict(bias=True, norm="layernorm", ffn="gelu", pos="learned"),
        dict(norm="layernorm", bias=False),
        dict(norm="rmsnorm_noweight", qk_norm=True, ffn="relu2"),
        dict(qk_norm=True, n_kv_head=1, norm_placement="post"),
        dict(d_ff=200),
    ],
)
def test_count_params_equals_our_decoder(overrides):
    config = DecoderConfig(
        vocab_size=101, context_length=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2
    ).replace(**overrides)
    assert count_params(config)["total"] == meta_numel(lambda: DecoderLM(config))


def test_decoder_config_equals_its_llama_conversion():
    config = DecoderConfig(vocab_size=101, context_length=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2)
    from common.models.hf_llama import llama_config

    assert count_params(config)["total"] == count_params(llama_config(config))["total"]


# Published totals: Llama-2-70B from meta-llama/Llama-2-70b-hf (the safetensors metadata: 68,976,648,192);
# Mixtral 8x7B's 46.7B from Mistral AI's announcement (mistral.ai/news/mixtral-of-experts) and its
# safetensors index; DeepSeek-V3's 671B total / 37B active from its technical report (arXiv 2412.19437).
PUBLISHED = {"llama-2-70b": 68_976_648_192, "mixtral-8x7b": 46_702_792_704, "deepseek-v3": 671_026_404_352}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_totals(name):
    assert count_params(name)["total"] == PUBLISHED[name]
    assert count_params(name)["total"] == hf_numel(estimate.preset_config(name))


def test_deepseek_v3_active_is_about_37b():
    assert 36e9 < count_params("deepseek-v3")["active"] < 38e9


def test_presets_against_meta_models():
    for name in ("llama-2-7b", "llama-2-13b", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert count_params(name)["total"] == hf_numel(estimate.preset_config(name)), name
    # GPT-2's published sizes (openai-community/gpt2*: 124M, 355M, 774M, 1.5B)
    assert count_params("gpt2")["total"] == 124_439_808
    assert count_params("llama-2-7b")["total"] == 6_738_415_616  # meta-llama/Llama-2-7b-hf


def test_local_config_json(tmp_path):
    config = estimate.preset_config("llama-2-7b")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert count_params(str(tmp_path)) == count_params("llama-2-7b")
    assert count_params(str(tmp_path / "config.json")) == count_params(config)


@pytest.mark.parametrize("bad", ["llama-3-8b", "no/such/path.json", 42, DecoderLM])
def test_unknown_model_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="llama-2-70b"):
        count_params(bad)


def test_unsupported_family_in_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="deepseek_v3"):
        model_shape(str(tmp_path))


def test_flops_per_token_by_hand():
    c = DecoderConfig(
        vocab_size=100, context_length=16, n_layer=2, d_model=32, n_head=4, n_kv_head=4, d_ff=64
    )
    p = count_params(c)
    matmul = p["total"] - 100 * 32  # everything but the embedding lookup
    assert flops_per_token(c, seq_len=10) == 2 * matmul + 2 * 2 * 2 * 10 * 32
    assert training_flops(c, tokens=1000) == 6 * matmul * 1000
    tied = c.replace(tie_embeddings=True)
    assert flops_per_token(tied, 10) == flops_per_token(c, 10)  # the head still multiplies
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(c, seq_len=0)
    with pytest.raises(ValueError, match="tokens"):
        training_flops(c, tokens=-5)


def test_moe_flops_use_active_params():
    dense = flops_per_token("mixtral-8x7b", seq_len=1)
    p = count_params("mixtral-8x7b")
    assert dense == 2 * (p["active"] - p["embedding"]) + 2 * 32 * 1 * (4096 + 4096)
