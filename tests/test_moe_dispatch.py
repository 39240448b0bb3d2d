"""The fast dispatch equals the dense loop (forward and gradients) for every router; router behaviour
(capacity by position, random routing, jitter, the aux-loss-free bias, the sequence-wise loss); errors."""

import math

import pytest
import torch

from common.moe import (
    DeepSeekMoE,
    Experts,
    GShardMoE,
    SwitchMoE,
    TopKMoE,
    dense_loop,
    dispatch,
    expert_capacity,
    sequence_balance_loss,
)
from common.moe.deepseek_router import DeepSeekRouter
from common.moe.switch_router import SwitchRouter
from common.moe.topk_router import TopKRouter

D = 16

LAYERS = {
    "topk": lambda: TopKMoE(D, 24, 8, k=3, z_coef=1e-3),
    "switch": lambda: SwitchMoE(D, 24, 8, capacity_factor=1.0, jitter=0.1),
    "switch_passthrough": lambda: SwitchMoE(D, 24, 8, capacity_factor=0.5, dropped="passthrough"),
    "gshard": lambda: GShardMoE(D, 24, 8, capacity_factor=0.75),
    "deepseek_v3": lambda: DeepSeekMoE(
        D, 8, 16, k=4, n_shared=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, seq_balance_coef=1e-3
    ),
    "deepseek_v2": lambda: DeepSeekMoE(
        D, 8, 16, k=3, scoring="softmax", n_group=4, topk_group=2, norm_topk_prob=False, balance_coef=1e-2
    ),
}


def _grads(layer, x, reference, seed):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same jitter / random routing in both runs
    out, aux_loss = layer(x, reference=reference)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, layer.last_stats


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("grouped_mm", [False, True])
def test_dispatch_equals_dense_loop_forward_and_backward(name, training, grouped_mm):
    if grouped_mm and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    torch.manual_seed(0)
    layer = LAYERS[name]().train(training)
    layer.experts.use_grouped_mm = grouped_mm
    x = torch.randn(3, 10, D)
    out_f, gx_f, g_f, stats_f = _grads(layer, x, reference=False, seed=1)
    out_r, gx_r, g_r, stats_r = _grads(layer, x, reference=True, seed=1)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx_f, gx_r, atol=1e-5, rtol=0)
    assert g_f.keys() == g_r.keys()
    assert any(n.startswith("router.") for n in g_f) and any(n.startswith("experts.") for n in g_f)
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_r[n], atol=1e-5, rtol=0, msg=n)
    assert torch.equal(stats_f.counts, stats_r.counts) and stats_f.dropped == stats_r.dropped
    assert (
        int(stats_f.counts.sum()) + stats_f.dropped
        == stats_f.slots
        == 30 * layer.last_routing.expert_idx.shape[1]
    )


@pytest.mark.parametrize("grouped_mm", [False, True])
def test_dispatch_with_empty_experts_and_all_dropped(grouped_mm):
    experts = Experts(6, D, 8, use_grouped_mm=grouped_mm)
    x = torch.randn(5, D)
    idx = torch.tensor([[0, 1]] * 5)  # experts 2..5 get nothing
    w = torch.rand(5, 2)
    out, counts, dropped = dispatch(x, experts, idx, w)
    torch.testing.assert_close(out, dense_loop(x, experts, idx, w), atol=1e-6, rtol=0)
    assert counts.tolist() == [5, 5, 0, 0, 0, 0] and dropped == 0
    none_kept = torch.zeros(5, 2, dtype=torch.bool)
    out, counts, dropped = dispatch(x, experts, idx, w, none_kept)
    assert torch.count_nonzero(out) == 0 and dropped == 10


def test_switch_capacity_drops_by_position():
    router = SwitchRouter(D, 4, capacity_factor=1.0, jitter=0.0).eval()
    with torch.no_grad():
        router.classifier.weight.zero_()
        router.classifier.weight[2, 0] = 10.0  # every token prefers expert 2
    x = torch.zeros(12, D)
    x[:, 0] = 1.0
    r = router(x)
    cap = expert_capacity(1.0, 12, 4)
    assert cap == 3 and r.expert_idx[:, 0].eq(2).all()
    assert r.keep[:, 0].tolist() == [True] * cap + [False] * (12 - cap)  # the first three win
    assert (r.weights[~r.keep] == 0).all()


def test_switch_jitter_in_training_only():
    router = SwitchRouter(D, 4, jitter=0.2)
    x = torch.randn(8, D)
    eval_logits = router.eval()(x).logits
    assert torch.equal(eval_logits, router(x).logits)
    assert not torch.allclose(router.train()(x).logits, eval_logits)


def test_gshard_random_routing_is_seedable_and_off_in_eval():
    torch.manual_seed(0)
    base = GShardMoE(D, 24, 8, capacity_factor=4.0, seed=123)
    twin = GShardMoE(D, 24, 8, capacity_factor=4.0, seed=123)
    twin.load_state_dict(base.state_dict())
    x = torch.randn(4, 64, D)
    base.train()(x)
    twin.train()(x)
    keep = base.last_routing.keep
    assert torch.equal(keep, twin.last_routing.keep)
    assert keep[:, 0].all() and not keep[:, 1].all()  # only second choices are sampled
    p2 = base.last_routing.logits.softmax(-1).topk(2).values[:, 1]
    expected = torch.clamp(2 * p2, max=1).mean()
    assert abs(keep[:, 1].float().mean() - expected) < 0.1  # kept with probability min(1, 2·p2)
    w = base.last_routing.weights
    torch.testing.assert_close(w[~keep[:, 1], 0], torch.ones(int((~keep[:, 1]).sum())))  # renormalised
    base.eval()(x)
    assert base.last_routing.keep.all()


def test_deepseek_bias_update_outside_autograd():
    router = DeepSeekRouter(D, 4, k=1, bias_update_speed=0.01).train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 5.0  # expert 0 overloaded
    x = torch.zeros(10, D)
    x[:, 0] = 1.0
    r = router(x)
    b = router.e_score_correction_bias
    assert not b.requires_grad and r.expert_idx.eq(0).all()
    torch.testing.assert_close(b, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    router.eval()(x)
    torch.testing.assert_close(b, torch.tensor([-0.01, 0.01, 0.01, 0.01]))  # no update in eval


def test_deepseek_bias_balances_load_without_aux_loss():
    torch.manual_seed(0)
    router = DeepSeekRouter(D, 8, k=2, bias_update_speed=0.02).train()
    with torch.no_grad():
        router.weight[0] += 1.0  # a favoured expert
    x = torch.randn(256, D) + 0.5
    first = torch.bincount(router(x).expert_idx.view(-1), minlength=8).float()
    for _ in range(100):
        last = torch.bincount(router(x).expert_idx.view(-1), minlength=8).float()
    assert last.max() / last.mean() < 0.7 * (first.max() / first.mean())


def test_sequence_balance_loss_formula():
    torch.manual_seed(0)
    batch, seq, E, k = 3, 5, 6, 2
    scores = torch.rand(batch * seq, E)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(batch * seq)])
    total = 0.0
    for b in range(batch):
        s = scores[b * seq : (b + 1) * seq]
        for i in range(E):
            f = E / (k * seq) * sum(int(i in idx[b * seq + t].tolist()) for t in range(seq))
            p = sum(float(s[t, i] / s[t].sum()) for t in range(seq)) / seq
            total += f * p
    torch.testing.assert_close(sequence_balance_loss(scores, idx, batch), torch.tensor(total / batch))


def test_stats_and_aux_loss_zero_in_eval():
    layer = TopKMoE(D, 24, 8, k=2).eval()
    _, aux_loss = layer(torch.randn(2, 8, D))
    assert float(aux_loss) == 0.0
    s = layer.last_stats
    c = s.counts.float()
    assert math.isclose(s.max_over_mean, float(c.max() / c.mean()), rel_tol=1e-6)
    assert math.isclose(s.cv, float(c.std(unbiased=False) / c.mean()), rel_tol=1e-6)
    assert s.as_dict()["dropped_fraction"] == 0.0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: TopKRouter(D, 4, k=5), "top-k"),
        (lambda: TopKMoE(D, 8, 4, k=0), "top-k"),
        (lambda: SwitchMoE(D, 8, 4, capacity_factor=0.0), "capacity_factor"),
        (lambda: GShardMoE(D, 8, 4, capacity_factor=-1.0), "capacity_factor"),
        (lambda: DeepSeekMoE(D, 8, 10, k=2, n_group=4, topk_group=1), "divide"),
        (lambda: DeepSeekMoE(D, 8, 8, k=2, n_group=4, topk_group=5), "topk_group"),
        (lambda: DeepSeekMoE(D, 8, 8, k=5, n_group=4, topk_group=2), "do not fit"),
        (lambda: DeepSeekMoE.fine_grained(D, 30, 4, k=1, m=4), "divide"),
        (lambda: Experts(4, D, 8, kind="tanh"), "expert kind"),
        (lambda: SwitchMoE(D, 8, 4, dropped="drop"), "dropped"),
    ],
)
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_shapes():
    layer = TopKMoE(D, 8, 4, k=2)
    with pytest.raises(ValueError, match="batch, seq"):
        layer(torch.randn(4, D))
    with pytest.raises(ValueError, match="batch, seq"):
        layer(torch.randn(2, 4, D + 1))
    with pytest.raises(ValueError, match="tokens"):
        dispatch(torch.randn(4, D), layer.experts, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))
