"""common.fmoe: fastmoe's API in pure PyTorch, each piece against a brute-force reference written
from fastmoe's source, DeepSpeed's gating, and real two-process expert parallelism over gloo."""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tree

from common.fmoe import (
    DistributedGroupedDataParallel,
    FMoE,
    FMoELinear,
    FMoETransformerMLP,
    GShardGate,
    NaiveGate,
    NoisyGate,
    SwitchGate,
)
from common.fmoe.backend import fmoe_backend
from common.fmoe.expert_parallel import check_ep_size, local_experts
from common.fmoe.gates.utils import cap_global_expert_count, limit_by_capacity, prune_gate_by_capacity
from common.launch import WorkerError, run_workers

ATOL = 1e-5


def _slot_loop(x, idx, score, expert):
    """Per token, per slot: ``out[t] += score[t, j] · expert_{idx[t, j]}(x[t])``; dropped slots (-1) add 0."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= 0:
                out[t] = out[t] + score[t, j] * expert(e, x[t : t + 1])[0]
    return out


def _mlp_expert(layer):
    def run(e, rows):
        ex = layer.experts[e]
        h = F.gelu(rows @ ex.htoh4.weight[0].T + ex.htoh4.bias[0])
        return h @ ex.h4toh.weight[0].T + ex.h4toh.bias[0]

    return run


def _record_gate(layer):
    seen = {}
    layer.gate_hook = lambda idx, score, _: seen.update(idx=idx.clone(), score=score.clone())
    return seen


# ----------------------------------------------------------------------------- gates


def test_naive_gate_is_topk_of_logits_with_softmax_over_the_k():
    gate = NaiveGate(16, 3, 2, top_k=2)  # 3 experts on each of 2 workers: 6 in the gate
    x = torch.randn(10, 16)
    idx, score = gate(x)
    logits = (x @ gate.gate.weight.T + gate.gate.bias).detach()
    # fastmoe's topk(sorted=False): the k largest, in the order torch's kernel leaves them
    assert torch.equal(idx, torch.topk(logits, 2, sorted=False).indices)
    for t in range(10):
        assert set(idx[t].tolist()) == set(sorted(range(6), key=lambda e: -float(logits[t, e]))[:2])
        p = torch.softmax(logits[t], -1)[idx[t]]
        torch.testing.assert_close(score[t], p / p.sum(), atol=ATOL, rtol=0)
    loss = gate.get_loss()  # fastmoe's dummy loss: a zero that a sum of every gate's loss can carry
    assert torch.equal(loss.detach(), torch.zeros(1)) and loss.requires_grad
    assert tuple(gate.gate.weight.shape) == (6, 16)
    assert NaiveGate(16, 4, 1, gate_bias=False).gate.bias is None


def test_gshard_gate_loss_capacity_and_random_routing_follow_fastmoe():
    torch.manual_seed(0)
    gate = GShardGate(8, 4, 1, capacity=(0.2, 0.2), random_routing=False).train()
    x = torch.randn(40, 8)
    idx, score = gate(x)
    logits = gate.gate(x)
    chosen = torch.topk(logits, 2, sorted=False).indices  # the gate's own (tokens, 2) choice
    # fastmoe's formula, written out: c_e over column 0 / S, m_e mean softmax, mean(c·m)·n²
    c = torch.zeros(4).scatter_add(0, chosen[:, 0], torch.ones(40)) / 40
    m = logits.softmax(1).mean(0)
    torch.testing.assert_close(gate.get_loss(), (c * m).mean() * 4**2, atol=ATOL, rtol=0)
    # fastmoe >= 1.0.1: ceil(0.2 · 40) · 2 // (1 · 4) = 4 slots per expert, first come in (token, slot) order
    assert gate.slots_per_expert(40) == 4
    seen = [0] * 4
    for t in range(40):
        for j in range(2):
            e = int(chosen[t, j])
            want = e if seen[e] < 4 else -1
            seen[e] += 1
            assert int(idx[t, j]) == want
    assert gate.get_loss() is None  # cleared when read


def test_gshard_capacity_is_fastmoe_v101s_share_of_the_slots():
    # the case: 16 tokens at rate 1.2 on 4 global experts keep ceil(19.2) · 2 // 4 = 10 slots
    # each (fastmoe v1.0.0, and this package before, gave every expert ceil(1.2 · 16) = 20: no drop)
    assert GShardGate(8, 4, 1, capacity=(1.2, 2.4)).train().slots_per_expert(16) == 10
    assert GShardGate(8, 2, 2, capacity=(1.2, 2.4)).train().slots_per_expert(16) == 10  # 2 workers x 2
    assert GShardGate(8, 2, 1, capacity=(1.2, 2.4)).eval().slots_per_expert(16) == 39  # ceil(38.4) · 2 // 2
    gate = GShardGate(8, 2, 1, capacity=(1.2, 1.2), random_routing=False).train()
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.copy_(torch.tensor([1.0, 0.0]))  # every token: expert 0 first, expert 1 second
    idx, _ = gate(torch.randn(16, 8))
    assert (idx[:, 0] >= 0).sum() == 16 and (idx[:, 1] >= 0).sum() == 16  # 20 slots each: nothing dropped
    tight = GShardGate(8, 4, 1, capacity=(1.2, 1.2), random_routing=False).train()
    with torch.no_grad():
        tight.gate.weight.zero_()
        tight.gate.bias.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))
    idx, _ = tight(torch.randn(16, 8))
    assert torch.bincount(idx[idx >= 0], minlength=4).tolist() == [10, 10, 0, 0]


def test_capacity_helpers_are_fastmoes_kernels():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, -1]])
    # keep the first expert_count[e] slots of each expert in (token, slot) order
    assert prune_gate_by_capacity(idx, torch.tensor([2, 1, 0]), 3, 1).tolist() == [
        [0, 1],
        [0, -1],
        [-1, -1],
        [-1, -1],
    ]
    # two senders propose (4, 1) and (3, 5) rows to two local experts of capacity 5: sender 0 first
    gec = torch.tensor([4, 1, 3, 5])
    assert cap_global_expert_count(gec, torch.tensor([5, 5]), 2, 2).tolist() == [4, 1, 1, 4]
    new_lec, new_gec, pruned = limit_by_capacity(idx, 3, 1, 1)
    assert new_lec.tolist() == new_gec.tolist() == [1, 1, 1]
    assert pruned.tolist() == [[0, 1], [-1, 2], [-1, -1], [-1, -1]]


def test_gshard_random_routing_drops_second_where_twice_its_score_is_below_uniform():
    gate = GShardGate(8, 4, 1, capacity=(10.0, 10.0), random_routing=True).train()
    x = torch.randn(200, 8)
    torch.manual_seed(1)
    idx, score = gate(x)
    torch.manual_seed(1)
    u = torch.rand(200)
    assert torch.equal(idx[:, 1] == -1, 2 * score[:, 1] < u)
    assert (idx[:, 0] >= 0).all()


def test_gshard_loss_equals_deepspeed_top2gating():
    from common.env import require

    require("deepspeed")
    from deepspeed.moe.sharded_moe import top2gating

    gate = GShardGate(16, 8, 1, random_routing=False)
    x = torch.randn(64, 16)
    gate(x)
    logits = gate.gate(x).detach()
    # fastmoe counts column 0 as the first choice, DeepSpeed the argmax: equal where torch's CPU
    # top-2 (sorted=False) leaves the larger first, as it does here
    assert torch.equal(torch.topk(logits, 2, sorted=False).indices[:, 0], logits.argmax(-1))
    l_aux = top2gating(logits.clone(), 1.0, 0, top2_2nd_expert_sampling=False)[0]
    torch.testing.assert_close(gate.get_loss().detach(), l_aux, atol=ATOL, rtol=0)


def test_switch_gate_loss_capacity_and_deepspeed_top1gating():
    from common.env import require

    require("deepspeed")
    from deepspeed.moe.sharded_moe import top1gating

    gate = SwitchGate(16, 8, 1, capacity=(0.5, 0.5)).eval()  # eval: no noise
    x = torch.randn(64, 16)
    idx, score = gate(x)
    probs = gate.gate(x).softmax(-1)
    cap = math.ceil(0.5 * 64 / 8)
    seen, kept = [0] * 8, []
    for t in range(64):
        e = int(probs[t].argmax())
        assert int(idx[t, 0]) == (e if seen[e] < cap else -1)
        seen[e] += 1
        kept += [e] if int(idx[t, 0]) >= 0 else []
        torch.testing.assert_close(score[t, 0], probs[t].max(), atol=ATOL, rtol=0)
    f = torch.bincount(torch.tensor(kept), minlength=8).float() / len(kept)
    p = probs.sum(0) / len(kept)
    torch.testing.assert_close(gate.get_loss(), (f * p).sum() * 8, atol=ATOL, rtol=0)
    # with room for every token, fastmoe's loss is DeepSpeed's top1gating l_aux
    roomy = SwitchGate(16, 8, 1, capacity=(8.0, 8.0)).eval()
    roomy.load_state_dict(gate.state_dict())
    roomy(x)
    l_aux = top1gating(roomy.gate(x).detach(), 8.0, 0, use_rts=False)[0]
    torch.testing.assert_close(roomy.get_loss().detach(), l_aux, atol=ATOL, rtol=0)


def test_switch_gate_adds_uniform_noise_to_logits_in_training():
    gate = SwitchGate(16, 4, 1, switch_eps=0.1, capacity=(10.0, 10.0)).train()
    x = torch.randn(32, 16)
    torch.manual_seed(3)
    idx, score = gate(x)
    torch.manual_seed(3)
    noisy = gate.gate(x) + torch.rand(32, 4) * 0.2 + 0.9
    torch.testing.assert_close(score[:, 0], noisy.softmax(-1).max(-1).values, atol=ATOL, rtol=0)


def test_noisy_gate_eval_is_topk_with_cv_squared_loss():
    gate = NoisyGate(16, 6, 1, top_k=2).eval()
    x = torch.randn(30, 16)
    idx, score = gate(x)
    assert idx.shape == (60,) and score.shape == (30, 1, 2)
    logits = x @ gate.w_gate
    top = logits.topk(2, dim=1)
    assert torch.equal(idx.view(30, 2), top.indices)
    gates = torch.zeros(30, 6).scatter(1, top.indices, top.values.softmax(1))
    importance, load = gates.sum(0), (gates > 0).sum(0).float()
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    torch.testing.assert_close(gate.get_loss(), cv2(importance) + cv2(load), atol=ATOL, rtol=0)
    gate.train()
    gate(x)
    assert gate.get_loss().requires_grad  # the load is differentiable under noise


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "gate,k,kwargs",
    [
        (NaiveGate, 1, {}),
        (NaiveGate, 3, {}),
        (GShardGate, 2, {}),
        (SwitchGate, 1, {}),
        (NoisyGate, 2, {}),
    ],
)
def test_fmoe_transformer_mlp_equals_the_slot_loop(gate, k, kwargs):
    torch.manual_seed(0)
    layer = FMoETransformerMLP(6, 16, 24, top_k=k, gate=gate, **kwargs).eval()
    if gate is SwitchGate or gate is GShardGate:
        layer.gate.capacity = (0.3, 0.3)  # some slots dropped
    seen = _record_gate(layer)
    x = torch.randn(2, 9, 16)
    y = layer(x)
    ref = _slot_loop(x.view(-1, 16), seen["idx"].view(18, k), seen["score"].view(18, k), _mlp_expert(layer))
    torch.testing.assert_close(y.view(-1, 16), ref, atol=ATOL, rtol=0)
    if gate in (SwitchGate, GShardGate):
        assert (seen["idx"] == -1).any() or gate is GShardGate


def test_fmoe_gradients_equal_the_slot_loop():
    torch.manual_seed(0)
    layer = FMoETransformerMLP(4, 8, 12, top_k=2)
    seen = _record_gate(layer)
    x = torch.randn(11, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    gx = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    # the reference recomputes the scores from the gate so that the gate gets its gradient too
    logits = layer.gate.gate(x)
    score = torch.gather(logits, 1, seen["idx"]).softmax(-1)
    _slot_loop(x, seen["idx"], score, _mlp_expert(layer)).pow(2).sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)


class _CountingExpert(torch.nn.Linear):
    """A custom expert: fastmoe calls each as ``expert(rows, torch.tensor([rows]))``."""

    def __init__(self, d):
        super().__init__(d, d)
        self.counts = []

    def forward(self, x, fwd_expert_count):
        self.counts.append(fwd_expert_count)
        return tree.map_structure(super().forward, x)  # a tensor, or a dict/list of the expert's rows


def test_fmoe_with_a_custom_expert_module_and_fmoe_linear():
    torch.manual_seed(0)
    layer = FMoE(3, 8, top_k=2, expert=_CountingExpert)
    seen = _record_gate(layer)
    x = torch.randn(7, 8)
    y = layer(x)
    ref = _slot_loop(x, seen["idx"], seen["score"], lambda e, r: layer.experts[e](r, None))
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    counts = [ex.counts[0] for ex in layer.experts]  # the count each expert got, before the reference's calls
    assert all(c.dtype == torch.int64 and c.device.type == "cpu" and c.shape == (1,) for c in counts)
    assert [int(c) for c in counts] == torch.bincount(seen["idx"].view(-1), minlength=3).tolist()
    lin = FMoELinear(3, 8, 5)
    rows, counts = torch.randn(9, 8), [2, 0, 7]
    want = torch.cat([rows[:2] @ lin.weight[0].T, rows[2:] @ lin.weight[2].T]) + torch.cat(
        [lin.bias[0].expand(2, 5), lin.bias[2].expand(7, 5)]
    )
    torch.testing.assert_close(lin(rows, counts), want, atol=ATOL, rtol=0)
    # backward written out (MOELinear) against autograd through the same products
    rows.requires_grad_()
    g = torch.randn(9, 5)
    (lin(rows, torch.tensor(counts)) * g).sum().backward()
    got = rows.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    rows.grad, lin.weight.grad, lin.bias.grad = None, None, None
    auto = torch.cat([rows[:2] @ lin.weight[0].T + lin.bias[0], rows[2:] @ lin.weight[2].T + lin.bias[2]])
    (auto * g).sum().backward()
    for a, b in zip(got, (rows.grad, lin.weight.grad, lin.bias.grad)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # fastmoe casts the input to the weight's dtype
    half = FMoELinear(1, 8, 5).to(torch.bfloat16)
    assert half(torch.randn(3, 8)).dtype == torch.bfloat16


def test_masked_tokens_skip_the_experts_and_take_mask_dict():
    torch.manual_seed(0)
    mask = torch.tensor([0, 1, 0, 2, 0])
    rows = {1: torch.full((8,), 3.0), 2: torch.arange(8.0)}
    layer = FMoETransformerMLP(4, 8, 16, top_k=2, mask=mask, mask_dict=rows)
    plain = FMoETransformerMLP(4, 8, 16, top_k=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(5, 8)
    y, ref = layer(x), plain(x)
    score = layer.gate(x)[1]  # (tokens, k): a masked token's output is its scores times its row
    keep = mask == 0
    torch.testing.assert_close(y[keep], ref[keep], atol=ATOL, rtol=0)
    for t in (1, 3):
        torch.testing.assert_close(y[t], score[t].sum() * rows[int(mask[t])], atol=ATOL, rtol=0)


def test_dict_and_list_inputs_route_every_tensor_by_one_gate():
    torch.manual_seed(0)
    layer = FMoE(4, 8, top_k=2, expert=_CountingExpert)
    layer.gate = _FirstTensorGate(8, 4, 1)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    out = layer({"a": x, "b": y})
    assert set(out) == {"a", "b"}
    single = FMoE(4, 8, top_k=2, expert=_CountingExpert)
    single.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out["a"], single(x), atol=ATOL, rtol=0)
    idx, score = single.gate(x)  # y goes where x's gate sent it
    ref = _slot_loop(y, idx, score, lambda e, r: single.experts[e](r, None))
    torch.testing.assert_close(out["b"], ref, atol=ATOL, rtol=0)
    as_list = layer([x, y])
    assert isinstance(as_list, list) and torch.allclose(as_list[1], out["b"], atol=ATOL)
    with pytest.raises(ValueError, match="same batch size"):
        layer({"a": x, "b": y[:5]})


class _FirstTensorGate(NaiveGate):
    """Gates a dict or list input by its first tensor (as fastmoe's test_mimo gate)."""

    def forward(self, inp, return_all_scores=False):
        first = inp["a"] if isinstance(inp, dict) else inp[0]
        return super().forward(first, return_all_scores)


def _fastmoe_state_dict(num_expert, d_model, d_hidden, world_size=1):
    """A state dict named and shaped as fastmoe's FMoETransformerMLP (laekov/fastmoe fmoe/transformer.py)."""
    sd = {}
    for i in range(num_expert):
        sd[f"experts.{i}.htoh4.weight"] = torch.randn(1, d_hidden, d_model)
        sd[f"experts.{i}.htoh4.bias"] = torch.randn(1, d_hidden)
        sd[f"experts.{i}.h4toh.weight"] = torch.randn(1, d_model, d_hidden)
        sd[f"experts.{i}.h4toh.bias"] = torch.randn(1, d_model)
    sd["gate.gate.weight"] = torch.randn(num_expert * world_size, d_model)
    sd["gate.gate.bias"] = torch.randn(num_expert * world_size)
    return sd


def test_state_dict_round_trip_with_fastmoe_names():
    sd = _fastmoe_state_dict(4, 8, 16)
    layer = FMoETransformerMLP(4, 8, 16)
    layer.load_state_dict(sd, strict=True)
    back = layer.state_dict()
    assert list(back) == list(sd)
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    again = FMoETransformerMLP(4, 8, 16)
    again.load_state_dict(back, strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(again(x), layer(x))


def test_parallel_comm_tags_and_backend_switch():
    layer = FMoETransformerMLP(2, 8, 16, expert_dp_comm="dp")
    assert {p.dp_comm for p in layer.experts.parameters()} == {"dp"}
    assert {p.dp_comm for p in layer.gate.parameters()} == {"gate"}
    module, name = fmoe_backend()
    assert module.FMoETransformerMLP is not None and name  # real fmoe where it imports, else ours
    ours, name = fmoe_backend(prefer_real=False)
    assert ours.FMoETransformerMLP is FMoETransformerMLP and "common.fmoe" in name


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: FMoETransformerMLP(2, 8, 16, top_k=3), "top-k"),
        (lambda: FMoE(4, 8, gate=GShardGate, top_k=1), "2 experts"),
        (lambda: FMoE(4, 8, gate=SwitchGate, top_k=2), "1 expert"),
        (lambda: FMoETransformerMLP(2, 8, 16)(torch.randn(3, 7)), "d_model=8"),
        (lambda: local_experts(6, 4), "do not divide"),
        (lambda: check_ep_size(3, 4), "ep_size=3"),
        (lambda: FMoETransformerMLP(2, 8, 16, world_size=2), "process group has 1"),
    ],
)
def test_bad_input_gets_a_one_line_error(build, message):
    with pytest.raises(ValueError, match=message) as e:
        build()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- expert parallel (2 processes)


def _ep_worker(ctx, total_experts, d_model, d_hidden, tokens, top_k):
    torch.manual_seed(0)
    full = FMoETransformerMLP(total_experts, d_model, d_hidden, top_k=top_k)  # identical on every rank
    xs = torch.randn(ctx.world_size, tokens, d_model)  # the global batch, rank r holds xs[r]
    grad_out = torch.randn(ctx.world_size, tokens, d_model)
    ne = local_experts(total_experts, ctx.world_size)
    ep = FMoETransformerMLP(ne, d_model, d_hidden, world_size=ctx.world_size, top_k=top_k)
    ep.gate.load_state_dict(full.gate.state_dict())
    for e in range(ne):
        ep.experts[e].load_state_dict(full.experts[ctx.rank * ne + e].state_dict())
    x = xs[ctx.rank].clone().requires_grad_()
    y = ep(x)
    (y * grad_out[ctx.rank]).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "grads": {n: p.grad for n, p in ep.named_parameters()},
        "xs": xs,
        "grad_out": grad_out,
        "state": full.state_dict(),
    }


@pytest.mark.parametrize("tokens,experts,k", [(12, 4, 2), (3, 8, 2), (10, 2, 1)])
def test_two_process_expert_parallel_equals_one_process(tokens, experts, k):
    out = run_workers(_ep_worker, nproc=2, args=(experts, 8, 12, tokens, k), timeout=120)
    full = FMoETransformerMLP(experts, 8, 12, top_k=k)
    full.load_state_dict(out[0]["state"])
    xs = out[0]["xs"].view(-1, 8).clone().requires_grad_()
    y = full(xs)
    (y * out[0]["grad_out"].view(-1, 8)).sum().backward()
    ne = experts // 2
    for r in range(2):
        torch.testing.assert_close(out[r]["y"], y[r * tokens : (r + 1) * tokens].detach(), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            out[r]["x_grad"], xs.grad[r * tokens : (r + 1) * tokens], atol=ATOL, rtol=0
        )
        for e in range(ne):
            for p in ("htoh4.weight", "htoh4.bias", "h4toh.weight", "h4toh.bias"):
                want = dict(full.named_parameters())[f"experts.{r * ne + e}.{p}"].grad
                torch.testing.assert_close(out[r]["grads"][f"experts.{e}.{p}"], want, atol=1e-4, rtol=1e-4)
    for p in ("gate.gate.weight", "gate.gate.bias"):  # replicated: the ranks' gradients sum to one process's
        summed = out[0]["grads"][p] + out[1]["grads"][p]
        torch.testing.assert_close(summed, dict(full.named_parameters())[p].grad, atol=1e-4, rtol=1e-4)


def _too_many_experts(ctx):
    """Rank 1 cannot build its share of experts (the book's "too many experts"); rank 0 waits in the
    all-to-all for a peer that never comes."""
    if ctx.rank == 1:
        raise MemoryError("cannot allocate 4096 experts on rank 1")
    layer = FMoETransformerMLP(2, 8, 16, world_size=2)
    layer(torch.randn(4, 8))
    dist.barrier()


def test_a_failing_worker_ends_the_expert_parallel_job_with_its_error():
    start = time.monotonic()
    with pytest.raises(WorkerError) as e:
        run_workers(_too_many_experts, nproc=2, timeout=120)
    assert e.value.rank == 1 and "cannot allocate 4096 experts" in str(e.value)
    assert time.monotonic() - start < 60


def _switch_two_workers(ctx, tokens, rate):
    """Both workers send every token to global expert 0 (on worker 0)."""
    gate = SwitchGate(8, 1, ctx.world_size, capacity=(rate, rate)).eval()
    with torch.no_grad():
        gate.gate.weight.zero_()
        gate.gate.bias.copy_(torch.tensor([5.0, 0.0]))
    idx, _ = gate(torch.randn(tokens, 8))
    return int((idx == 0).sum())


def test_switch_capacity_counts_what_an_expert_receives_from_every_worker():
    # capacity ceil(0.5 · 8 / 1) = 4 rows for expert 0 in all: fastmoe keeps 4, not 4 per worker (8)
    kept = run_workers(_switch_two_workers, nproc=2, args=(8, 0.5), timeout=120)
    assert kept == [4, 0]  # sender 0 is served first
    assert run_workers(_switch_two_workers, nproc=2, args=(8, 2.0), timeout=120) == [8, 8]  # room for 16


def _grouped_allreduce(ctx, dtype, fp32):
    layer = torch.nn.Linear(4, 3).to(dtype)
    ddp = DistributedGroupedDataParallel(layer)  # parameters broadcast from rank 0
    for p in layer.parameters():
        p.grad = torch.full_like(p, 1.0 / 3.0 * (ctx.rank + 1))  # 1/3 and 2/3: the mean is 1/2
    ddp.allreduce_gradients(fp32_allreduce=fp32)
    return layer.weight.grad.float(), layer.weight.detach().float()


@pytest.mark.parametrize(
    "dtype,fp32", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)]
)
def test_grouped_data_parallel_averages_gradients(dtype, fp32):
    out = run_workers(_grouped_allreduce, nproc=2, args=(dtype, fp32), timeout=120)
    for grad, _ in out:
        torch.testing.assert_close(grad, torch.full_like(grad, 0.5), atol=4e-3, rtol=0)
    torch.testing.assert_close(out[0][1], out[1][1], atol=0, rtol=0)  # replicas start equal
