"""The estimators of common/estimate.py against transformers' models on the meta device, our own
DecoderLM, hand-computed small cases and published figures."""

import json

import pytest
import torch

from common import estimate
from common.estimate import (
    GPUS,
    count_params,
    deployment_plan,
    flops_per_token,
    kv_cache_bytes,
    model_shape,
    training_flops,
    weight_bytes,
)
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


# ----------------------------------------------------------------------------- weights


def test_weight_bytes_at_16_bits_is_two_per_parameter():
    assert estimate.weight_bytes("llama-2-70b", 16) == 2 * 68_976_648_192
    assert estimate.weight_bytes("llama-2-70b", 32) == 4 * 68_976_648_192


@pytest.mark.parametrize("name,config", list(tiny_configs()), ids=[n for n, _ in tiny_configs()])
def test_linear_shapes_are_the_models_matrices(name, config):
    """The quantised matrices are every 2-D/3-D weight but embeddings, the head and routers."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = ("embed_tokens", "lm_head", "wte", "wpe", "mlp.gate.weight")
    expected = sum(
        p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and not any(k in n for k in skip)
    )
    assert sum(i * o * c for _, i, o, c in estimate.linear_shapes(config)) == expected


def test_weight_bytes_group_quantisation_by_hand():
    c = DecoderConfig(
        vocab_size=100, context_length=16, n_layer=1, d_model=64, n_head=4, n_kv_head=4, d_ff=128
    )
    total = count_params(c)["total"]
    # matrices: qkv 64->192, proj 64->64, gate/up 64->128 x2, down 128->64
    mats = 64 * 192 + 64 * 64 + 2 * 64 * 128 + 128 * 64
    rows_and_groups_32 = (192 * 2 + 64 * 2 + 2 * 128 * 2) + 64 * 4  # output rows x (in/32)
    expected_bits = mats * 4 + rows_and_groups_32 * (16 + 4) + (total - mats) * 16
    assert estimate.weight_bytes(c, 4, group_size=32) == expected_bits // 8
    per_channel = mats * 4 + (192 + 64 + 2 * 128 + 64) * 20 + (total - mats) * 16
    assert estimate.weight_bytes(c, 4) == per_channel // 8
    assert estimate.weight_bytes(c, 3, 32) < estimate.weight_bytes(c, 4, 32) < estimate.weight_bytes(c, 8, 32)


@pytest.mark.parametrize("bits", [0, 1, 5, 12, 64, "4"])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match="2, 3, 4, 8, 16, 32"):
        estimate.weight_bytes("llama-2-7b", bits)


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide"):
        estimate.weight_bytes("llama-2-7b", 4, group_size=100)
    with pytest.raises(ValueError, match="positive"):
        estimate.weight_bytes("llama-2-7b", 4, group_size=0)


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_by_hand_and_published():
    # Llama-2-7B at 4k context, fp16: 2 · 32 layers · 4096 tokens · 32 heads · 128 · 2 bytes = 2 GiB
    assert estimate.kv_cache_bytes("llama-2-7b", 1, 4096) == 2 * 2**30
    # Llama-2-70B's GQA (8 KV heads): 2 · 80 · 8 · 128 · 2 = 327,680 bytes per token
    assert estimate.kv_cache_bytes("llama-2-70b", 1, 1) == 327_680
    # DeepSeek-V3's MLA: (512 + 64) values per token per layer, 61 layers (its report: 70 KB/token in bf16)
    assert estimate.kv_cache_bytes("deepseek-v3", 1, 1) == 61 * 576 * 2
    for bad in (dict(batch=0, seq_len=4), dict(batch=1, seq_len=-1)):
        with pytest.raises(ValueError, match="positive"):
            estimate.kv_cache_bytes("llama-2-7b", **bad)


def test_kv_cache_equals_our_cache():
    c = DecoderConfig(vocab_size=50, context_length=40, n_layer=3, d_model=64, n_head=4, n_kv_head=2)
    cache = DecoderLM(c).new_kv_cache(batch=3, max_len=40)
    stored = sum(t.nbytes for t in (*cache.k, *cache.v))
    assert stored == estimate.kv_cache_bytes(c, 3, 40, bytes_per_value=4)


@pytest.mark.parametrize("name", ["llama", "deepseek_v3"])
def test_kv_cache_equals_transformers_cache(name):
    from transformers import AutoModelForCausalLM

    config = dict(tiny_configs())[name]
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 97, (2, 7)), use_cache=True)
    stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    assert stored == estimate.kv_cache_bytes(config, 2, 7, bytes_per_value=4)
    if name == "deepseek_v3":  # transformers caches MLA's latent (16 + 8 per token per layer), not the heads
        assert stored == 4 * 2 * 7 * (16 + 8) * 4
        assert estimate.kv_cache_bytes(config, 2, 7, 4, mla="expanded") == 4 * 2 * 7 * 4 * (24 + 12) * 4


# ----------------------------------------------------------------------------- training memory


def autograd_saved_bytes(model, idx, fused_loss=False):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(idx, idx, fused_loss=fused_loss)
    return sum(seen.values())


@pytest.mark.parametrize("fused_loss", [False, True], ids=["plain-head", "fused-head"])
@pytest.mark.parametrize("shape", [(1, 64, 4, 4, 32, 2), (2, 128, 4, 2, 64, 2), (3, 64, 2, 1, 48, 3)])
def test_activation_bytes_equal_autograd_saved_tensors(shape, fused_loss):
    n_layer, d, h, kv, t, b = shape
    c = DecoderConfig(vocab_size=300, context_length=64, n_layer=n_layer, d_model=d, n_head=h, n_kv_head=kv)
    idx = torch.randint(0, 300, (b, t))
    saved = autograd_saved_bytes(DecoderLM(c), idx, fused_loss)
    assert estimate.activation_bytes(c, b, t, fused_loss=fused_loss) == saved


def test_checkpointing_keeps_less():
    c = DecoderConfig(vocab_size=300, context_length=64, n_layer=8, d_model=64, n_head=4, n_kv_head=4)
    full, ckpt = estimate.activation_bytes(c, 4, 64), estimate.activation_bytes(c, 4, 64, checkpointing=True)
    per_layer = (full - estimate.activation_bytes(c.replace(n_layer=7), 4, 64)) // (4 * 64 * 4)
    # every layer keeps its input (d values per token), and one layer is recomputed in full at a time
    assert full - ckpt == (7 * per_layer - 8 * 64) * 4 * 64 * 4


@pytest.mark.parametrize("use_muon", [False, True])
def test_optimizer_states_equal_torch(use_muon):
    from common.training import build_optimizer

    c = DecoderConfig(vocab_size=100, context_length=16, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    model = DecoderLM(c)
    opt = build_optimizer(model, use_muon=use_muon)
    _, loss = model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
    loss.backward()
    opt.step()
    states = [s for o in opt.optimizers.values() for s in o.state.values()]
    stored = sum(v.nbytes for s in states for v in s.values() if torch.is_tensor(v) and v.numel() > 1)
    assert stored == estimate.optimizer_state_bytes(c, "muon" if use_muon else "adamw")


def test_training_memory_zero_shares():
    n = count_params("llama-2-7b")["total"]
    base = estimate.training_memory("llama-2-7b", 1, 1, mixed_precision=True)
    assert base["weights"] + base["gradients"] + base["optimizer"] == 16 * n  # ZeRO paper: (2 + 2 + K=12)Ψ
    z = {
        s: estimate.training_memory("llama-2-7b", 1, 1, mixed_precision=True, zero_stage=s, world_size=8)
        for s in (1, 2, 3)
    }
    assert z[1]["optimizer"] == 12 * n // 8 and z[1]["gradients"] == 2 * n
    assert z[2]["gradients"] == 2 * n // 8 and z[2]["weights"] == 2 * n
    assert z[3]["weights"] == 2 * n // 8
    with pytest.raises(ValueError, match="zero_stage"):
        estimate.training_memory("llama-2-7b", 1, 1, zero_stage=4)
    with pytest.raises(ValueError, match="adamw"):
        estimate.training_memory("llama-2-7b", 1, 1, optimizer="lion")


# ----------------------------------------------------------------------------- latency, throughput


def test_decode_is_memory_bound_at_batch_one():
    d = estimate.decode_latency("llama-2-7b", "h100-sxm", batch=1, context_len=1)
    nbytes = 2 * count_params("llama-2-7b")["total"] + estimate.kv_cache_bytes("llama-2-7b", 1, 1)
    assert d["bound"] == "memory" and d["seconds"] == pytest.approx(nbytes / 3350e9)


def test_crossover_batch_is_where_compute_meets_memory():
    b = estimate.crossover_batch("llama-2-70b", "a100-80gb", context_len=128)
    lo = estimate.decode_latency("llama-2-70b", "a100-80gb", batch=int(b), context_len=128)
    hi = estimate.decode_latency("llama-2-70b", "a100-80gb", batch=int(b) + 1, context_len=128)
    assert lo["bound"] == "memory" and hi["bound"] == "compute"
    # full multi-head attention's cache at 512 tokens already reads more bytes per sequence than the
    # A100's ridge point (153 FLOP/byte) can turn into compute: decode never becomes compute-bound
    assert estimate.crossover_batch("llama-2-7b", "a100-80gb", context_len=512) == float("inf")


def test_prefill_long_prompt_is_compute_bound():
    p = estimate.prefill_latency("llama-2-7b", "rtx-4060", batch=1, prompt_len=2048)
    assert p["compute_s"] > p["memory_s"]
    g = estimate.generation_time("llama-2-7b", "rtx-4060", batch=1, prompt_len=2048, new_tokens=100)
    assert g["ttft_s"] == p["seconds"] and g["tokens_per_s"] == pytest.approx(100 / g["total_s"])


def test_littles_law():
    assert estimate.littles_law(arrival_rate=2.0, latency_s=3.0) == 6.0
    assert estimate.littles_law(concurrency=6.0, latency_s=3.0) == 2.0
    assert estimate.littles_law(arrival_rate=2.0, concurrency=6.0) == 3.0
    with pytest.raises(ValueError, match="exactly two"):
        estimate.littles_law(arrival_rate=1.0)


def test_unknown_gpu_lists_the_table():
    with pytest.raises(ValueError, match="rtx-4060.*h200"):
        estimate.decode_latency("llama-2-7b", "rtx-5090", 1, 1)
    with pytest.raises(ValueError, match="batch"):
        estimate.decode_latency("llama-2-7b", "h100-sxm", 0, 1)


def test_inference_memory_parts():
    c = DecoderConfig(
        vocab_size=100, context_length=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64
    )
    m = estimate.inference_memory(c, batch=2, seq_len=64, prompt_len=16)
    assert m["weights"] == 4 * count_params(c)["total"]
    assert m["kv_cache"] == estimate.kv_cache_bytes(c, 2, 64, 4)
    assert m["transient"] == (2 * 16 * (2 * 32 + (4 + 4) * 8 + 3 * 64) + 2 * 100) * 4
    assert m["total"] == m["weights"] + m["kv_cache"] + m["transient"]
    with pytest.raises(ValueError, match="longer than seq_len"):
        estimate.inference_memory(c, 2, 16, prompt_len=32)


def _head_setup(tokens: int, d: int, vocab: int):
    torch.manual_seed(0)
    h = torch.randn(tokens, d, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d)).requires_grad_()
    return h, w, torch.randint(0, vocab, (tokens,))


def _plain_head_step(state):
    h, w, y = state
    logits = h @ w.T  # kept, as a caller of DecoderLM keeps the logits it gets back
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits.shape[0]


def test_plain_loss_head_transient_is_measured():
    """The plain head's backward holds the saved log-softmax (an activation) and loss_head_bytes' three
    tokens x vocab tensors at once: measured in a fresh process, with the two gradients it produces."""
    from common.machine import peak_memory

    tokens, d, vocab = 512, 64, 16384
    cfg = DecoderConfig(vocab_size=vocab, context_length=tokens, n_layer=1, d_model=d, n_head=2, n_kv_head=2)
    want = estimate.loss_head_bytes(cfg, tokens) + (tokens * vocab + vocab * d + tokens * d) * 4
    out = peak_memory(_head_setup, _plain_head_step, tokens, d, vocab)
    assert out["peak_bytes"] - out["setup_bytes"] == pytest.approx(want, rel=0.1)


def test_gpu_memory_is_the_capacity_the_card_reports():
    # a datasheet's "80 GB" is 80 GiB: nvidia-smi shows 81,920 MiB on an A100 80 GB
    assert GPUS["a100-80gb"].memory_gb * 1e9 == 81_920 * 2**20
    assert GPUS["h200"].memory_gb * 1e9 == 143_771 * 2**20
    row = next(r for r in deployment_plan("llama-2-13b", gpus=["a100-80gb"]) if r["precision"] == "fp16")
    left = 81_920 * 2**20 - weight_bytes("llama-2-13b", 16)
    assert row["left_gb"] * 1e9 == pytest.approx(left)
    assert row["context_tokens"] == left // kv_cache_bytes("llama-2-13b", batch=1, seq_len=1)
