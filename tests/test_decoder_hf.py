"""The decoder LM against transformers' LlamaForCausalLM (and Qwen3 for QK-norm) from tiny configs:
logits, loss and gradients with weights copied across, MHA/GQA/MQA, rope_theta, tied/untied, biases;
decoder_to_hf / decoder_from_hf round trips and save_pretrained / from_pretrained; the config's errors.
fp32, 1e-5."""

import pytest
import torch
from torch import nn

from common.models.decoder import DecoderConfig, DecoderLM
from common.models.hf_llama import decoder_from_hf, decoder_to_hf

ATOL = 1e-5


def tiny(**kw) -> DecoderConfig:
    base = dict(vocab_size=101, context_length=64, n_layer=2, d_model=32, n_head=4, n_kv_head=4)
    return DecoderConfig(**{**base, **kw})


def _randomise(model: nn.Module, std: float = 0.2) -> None:
    """Random weights everywhere (norm weights too), so that a mis-copied tensor shows in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**base, **kw})).eval()
    _randomise(model)
    return model


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_key_value_heads=4),  # MHA
        dict(num_key_value_heads=2),  # GQA
        dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),  # MQA
        dict(tie_word_embeddings=True),
        dict(attention_bias=True, mlp_bias=True),
    ],
    ids=["mha", "gqa", "mqa-theta5e5", "tied", "bias"],
)
def test_from_hf_matches_llama_logits_and_loss(kw):
    hf = _llama(**kw)
    ours = decoder_from_hf(hf)
    assert ours.config.n_kv_head == hf.config.num_key_value_heads
    idx = torch.randint(0, 101, (3, 17))
    labels = idx.clone()
    labels[0, :5] = -100  # ignored positions
    ref = hf(idx, labels=labels)
    # our targets are already shifted: targets[:, t] is the token after idx[:, t]
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    logits, loss = ours(idx, targets)
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=ATOL, rtol=0)
    no_logits, fused = ours(idx, targets, fused_loss=True)
    assert no_logits is None
    torch.testing.assert_close(fused, ref.loss, atol=ATOL, rtol=0)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


def test_gradients_match_llama():
    hf = _llama(num_key_value_heads=2)
    ours = decoder_from_hf(hf)
    idx = torch.randint(0, 101, (2, 12))
    hf(idx, labels=idx).loss.backward()
    ours(idx, torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1))[1].backward()
    layer = hf.model.layers[1]
    ref_qkv = torch.cat(
        [
            layer.self_attn.q_proj.weight.grad,
            layer.self_attn.k_proj.weight.grad,
            layer.self_attn.v_proj.weight.grad,
        ]
    )
    torch.testing.assert_close(ours.blocks[1].attn.qkv.weight.grad, ref_qkv, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(
        ours.tok_emb.weight.grad, hf.model.embed_tokens.weight.grad, atol=ATOL, rtol=1e-4
    )
    torch.testing.assert_close(
        ours.blocks[0].norm2.weight.grad,
        hf.model.layers[0].post_attention_layernorm.weight.grad,
        atol=ATOL,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(n_kv_head=1, tie_embeddings=True),
        dict(norm="rmsnorm_noweight"),
        dict(bias=True, rope_theta=1e6),
    ],
    ids=["default", "mqa-tied", "noweight", "bias"],
)
def test_to_hf_matches_our_logits_and_round_trips(kw):
    ours = DecoderLM(tiny(**kw)).eval()
    _randomise(ours)
    hf = decoder_to_hf(ours)
    idx = torch.randint(0, 101, (2, 20))
    torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=ATOL, rtol=0)
    back = decoder_from_hf(hf)
    torch.testing.assert_close(back(idx)[0], ours(idx)[0], atol=ATOL, rtol=0)
    if kw.get("norm") != "rmsnorm_noweight":  # the weightless norm comes back as an all-ones weight
        assert back.config == ours.config.replace(d_ff=ours.config.ffn_dim)
        for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), name


def test_save_pretrained_loads_back_from_the_folder(tmp_path):
    from transformers import LlamaForCausalLM

    ours = DecoderLM(tiny(n_kv_head=2)).eval()
    _randomise(ours)
    decoder_to_hf(ours).save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    idx = torch.randint(0, 101, (2, 15))
    torch.testing.assert_close(loaded(idx).logits, ours(idx)[0], atol=ATOL, rtol=0)


def test_qk_norm_matches_qwen3():
    """Qwen3 is Llama plus an RMSNorm over each head's queries and keys before RoPE: our qk_norm=True."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ours = DecoderLM(tiny(qk_norm=True, n_kv_head=2)).eval()
    _randomise(ours)
    plain = DecoderLM(tiny(n_kv_head=2))
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "_norm." not in k or "norm_f" in k})
    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=ours.config.ffn_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rms_norm_eps=ours.config.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    ).eval()
    sd = decoder_to_hf(plain).state_dict()
    for i, block in enumerate(ours.blocks):
        sd[f"model.layers.{i}.self_attn.q_norm.weight"] = block.attn.q_norm.weight
        sd[f"model.layers.{i}.self_attn.k_norm.weight"] = block.attn.k_norm.weight
    qwen.load_state_dict(sd, strict=True)
    idx = torch.randint(0, 101, (2, 16))
    torch.testing.assert_close(qwen(idx).logits, ours(idx)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kw,what",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(pos="learned"), "pos"),
        (dict(norm="layernorm"), "norm"),
        (dict(norm_placement="post"), "post"),
        (dict(ffn="gelu"), "ffn"),
    ],
)
def test_to_hf_refuses_what_llama_cannot_express(kw, what):
    with pytest.raises(ValueError, match=what):
        decoder_to_hf(DecoderLM(tiny(**kw)))


def test_from_hf_refuses_unsupported_llama():
    with pytest.raises(ValueError, match="hidden_act"):
        decoder_from_hf(_llama(hidden_act="gelu"))


# ----------------------------------------------------------------------------- variants and the interface

VARIANTS = [
    dict(norm="layernorm", bias=True),
    dict(norm_placement="post"),
    dict(pos="learned"),
    dict(qk_norm=True),
    dict(ffn="gelu"),
    dict(ffn="relu2", norm="rmsnorm_noweight"),
    dict(n_kv_head=1, tie_embeddings=True),
    dict(dropout=0.1),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_variants_are_causal_and_train(kw):
    torch.manual_seed(0)
    model = DecoderLM(tiny(**kw))
    idx = torch.randint(0, 101, (2, 16))
    model.eval()
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 101
    torch.testing.assert_close(model(changed)[0][:, :10], logits[:, :10], atol=ATOL, rtol=0)  # future unseen
    assert not torch.allclose(model(changed)[0][:, 10:], logits[:, 10:])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):  # overfit one batch: the loss must fall
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_tied_embeddings_share_one_tensor_and_param_counts():
    tied, untied = DecoderLM(tiny(tie_embeddings=True)), DecoderLM(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 101 * 32
    assert tied.num_params(non_embedding=True) == untied.num_params(non_embedding=True)
    learned = DecoderLM(tiny(pos="learned"))
    assert learned.num_params() - untied.num_params() == 64 * 32
    assert learned.num_params(non_embedding=True) == untied.num_params(non_embedding=True)


class _ToyMoE(nn.Module):
    """Stands in for an MoE layer: a dense layer that returns ``(output, aux_loss)`` as the MoE layers do."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        nn.init.constant_(self.lin.weight, 0.5)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach())
        return self.lin(x), 0.01 * x.square().mean()


def test_ffn_factory_plugs_in_layers_and_adds_their_aux_loss():
    model = DecoderLM(tiny(), ffn_factory=lambda i, c: _ToyMoE(c.d_model) if i in (0, 1) else None)
    assert isinstance(model.blocks[1].ffn, _ToyMoE) and isinstance(model.blocks[0].ffn, _ToyMoE)
    assert torch.all(model.blocks[1].ffn.lin.weight == 0.5)  # a plugged-in layer keeps its own initialisation
    idx = torch.randint(0, 101, (2, 9))
    logits, loss = model(idx, idx)
    ce = nn.functional.cross_entropy(logits.view(-1, 101), idx.view(-1))
    aux = sum(0.01 * b.ffn.inputs[-1].square().mean() for b in model.blocks)
    torch.testing.assert_close(loss, ce + aux)
    _, fused = model(idx, idx, fused_loss=True)
    torch.testing.assert_close(fused, ce + aux, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="needs targets"):
        model(idx, fused_loss=True)


def test_presets_and_config_errors():
    small = DecoderConfig.preset("small")
    assert (small.n_layer, small.d_model, small.n_head, small.n_kv_head) == (6, 384, 4, 4)
    large = DecoderConfig.preset("large", vocab_size=1000)
    assert (large.n_layer, large.d_model, large.n_head, large.n_kv_head, large.vocab_size) == (
        24,
        1536,
        12,
        6,
        1000,
    )
    with pytest.raises(ValueError, match="small, base, large"):
        DecoderConfig.preset("huge")
    with pytest.raises(ValueError, match="divide d_model"):
        tiny(n_head=5)
    with pytest.raises(ValueError, match="divide n_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="unknown ffn"):
        tiny(ffn="geglu")


def test_forward_rejects_long_sequences_and_bad_token_ids():
    model = DecoderLM(tiny())
    with pytest.raises(ValueError, match="longer than the context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        model(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.tensor([1, 2, 3]))
