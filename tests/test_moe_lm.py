"""s4_2_5's MoE LM against its dense twin: at equal active parameters the two feed-forwards start at the
same scale (the routed output times k), so the comparison is about routing, not about a smaller branch."""

import argparse

import pytest
import torch

from ch04_transformer_moe import s4_2_5_moe_lm as s425
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.feedforward import SwiGLU


def moe_args(**overrides):
    args = dict(first_dense=0, every=1, d_expert=16, experts=4, k=2, balance_coef=0.01, routed_scale=None)
    return argparse.Namespace(**{**args, **overrides})


@pytest.mark.parametrize("k", [1, 2, 3])
def test_agreeing_experts_compute_the_dense_feed_forward(k):
    """k identical experts of width d are the dense SwiGLU of width k·d cut in k: the MoE must equal it."""
    torch.manual_seed(0)
    d_model, d = 24, 16
    layer = s425.moe_factory(moe_args(k=k), n_layer=2)(0, DecoderConfig(d_model=d_model, n_head=4))
    gate, up, down = torch.randn(d, d_model), torch.randn(d, d_model), torch.randn(d_model, d) / d
    with torch.no_grad():
        layer.experts.gate_up.copy_(torch.cat([gate, up]).expand_as(layer.experts.gate_up))
        layer.experts.down.copy_(down.expand_as(layer.experts.down))
    dense = SwiGLU(d_model, k * d)
    with torch.no_grad():
        dense.gate_up.weight.copy_(torch.cat([gate.repeat(k, 1), up.repeat(k, 1)]))  # gate rows, then up
        dense.down.weight.copy_(down.repeat(1, k))
    x = torch.randn(2, 5, d_model)
    out, _aux_loss = layer(x)  # MoE layers return (output, auxiliary loss)
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routed_scale,ratio", [(None, 1.0), (1.0, 0.5)])
def test_feed_forward_scale_at_initialisation(routed_scale, ratio):
    """Measured on the script's own models: with the default the two branches start equal; with Mixtral's
    convention (scale 1) the MoE's starts at half the dense one's, which made it train slower."""
    config = DecoderConfig(vocab_size=64, context_length=16, n_layer=2, d_model=64, n_head=4, d_ff=2 * 96)
    torch.manual_seed(0)
    dense = DecoderLM(config)
    torch.manual_seed(0)
    moe = DecoderLM(
        config, ffn_factory=s425.moe_factory(moe_args(d_expert=96, experts=8, routed_scale=routed_scale), 2)
    )
    x = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
    measured = s425.ffn_output_rms(moe, x) / s425.ffn_output_rms(dense, x)
    assert measured == pytest.approx(ratio, rel=0.15)
    assert s425.active_params(moe) == pytest.approx(dense.num_params(), rel=0.01)
