"""s4_3_1's power-law fit recovers the E, A and alpha of losses made from a known law."""

import pytest

from ch04_transformer_moe.s4_3_1_scaling_analysis import fit_power_law, meta_count
from common.estimate import count_params
from common.models.decoder import DecoderConfig


@pytest.mark.parametrize("e, a, alpha", [(2.0, 30.0, 0.3), (1.2, 400.0, 0.076 * 5)])
def test_fit_recovers_a_known_law(e, a, alpha):
    ns = [3e4, 1e5, 3e5, 1e6, 3e6]
    got = fit_power_law(ns, [e + a * n**-alpha for n in ns])
    assert got == pytest.approx((e, a, alpha), rel=1e-4)


def test_meta_count_of_our_decoder():
    config = DecoderConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2)
    assert meta_count(config) == count_params(config)["total"]
