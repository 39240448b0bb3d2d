"""Impossible model settings are refused at construction with the value named; an empty batch is fine.

MoE layers: a NaN, infinite, zero or negative capacity factor; no experts; an empty batch in training
gives finite (zero) auxiliary losses and gradients.  DecoderConfig: d_ff <= 0, norm_eps <= 0.
"""

import math

import pytest
import torch

from common.models.decoder import DecoderConfig
from common.moe import DeepSeekMoE, GShardMoE, SwitchMoE, TopKMoE, expert_capacity


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), 0.0, -1.0])
@pytest.mark.parametrize("layer", [SwitchMoE, GShardMoE])
def test_capacity_factor_must_be_finite_and_positive(layer, factor):
    with pytest.raises(ValueError, match=f"capacity_factor must be a finite number > 0, got {factor}"):
        layer(16, 32, 4, capacity_factor=factor)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        expert_capacity(factor, 8, 4)


def test_expert_capacity_of_no_experts_and_of_no_tokens():
    with pytest.raises(ValueError, match="num_experts must be >= 1, got 0"):
        expert_capacity(1.0, 8, 0)
    with pytest.raises(ValueError, match="tokens must be >= 0, got -1"):
        expert_capacity(1.0, -1, 4)
    assert expert_capacity(1.0, 0, 8) == 0 and expert_capacity(1.25, 0, 8, k=2) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopKMoE(16, 32, 4, 2),
        lambda: SwitchMoE(16, 32, 4),
        lambda: GShardMoE(16, 32, 4),
        lambda: DeepSeekMoE(16, 32, 4, 2),
    ],
    ids=["topk", "switch", "gshard", "deepseek"],
)
@pytest.mark.parametrize("shape", [(0, 5, 16), (2, 0, 16)], ids=["no-sequences", "empty-sequences"])
def test_an_empty_batch_gives_finite_auxiliary_losses(make, shape):
    layer = make().train()
    x = torch.zeros(shape, requires_grad=True)
    y, aux_loss = layer(x)
    assert y.shape == shape
    assert aux_loss.item() == 0.0  # nothing routed: no imbalance, and no 0/0
    (y.sum() + aux_loss).backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_ff", 0, "d_ff must be positive (or None for the default width), got 0"),
        ("d_ff", -64, "d_ff must be positive (or None for the default width), got -64"),
        ("norm_eps", 0.0, "norm_eps must be a finite number > 0, got 0.0"),
        ("norm_eps", -1.0, "norm_eps must be a finite number > 0, got -1.0"),
        ("norm_eps", math.nan, "norm_eps must be a finite number > 0, got nan"),
    ],
)
def test_decoder_config_rejects_impossible_widths_and_eps(field, value, message):
    with pytest.raises(ValueError) as e:
        DecoderConfig(**{field: value})
    assert str(e.value) == message
    assert DecoderConfig(d_ff=96).ffn_dim == 96  # a given width is used as given
