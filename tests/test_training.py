"""common.training and common.checkpoint: schedule, optimizer split, bpb, exact resume, DDP."""

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt
from common.data import TokenData
from common.launch import free_port
from common.training import TrainConfig, build_optimizer, evaluate, lr_at, split_parameters, train

V, T = 32, 16


class StandInLM(nn.Module):
    """A small LM with the training loop's contract: forward(idx, targets) -> (logits, loss).

    Dropout is on, so resuming exactly needs the RNG state restored too.
    """

    def __init__(self, vocab=V, d=32, context=T, tie=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.norm1 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.mix = nn.Linear(2 * d, d, bias=False)  # mixes each position with the previous one
        self.drop = nn.Dropout(0.1)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx, targets=None):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # (batch, seq, d)
        prev = F.pad(h, (0, 0, 1, 0))[:, :-1]  # (batch, seq, d): the previous position's vector
        h = h + self.mix(torch.cat([h, prev], dim=-1))
        h = h + self.drop(self.down(F.gelu(self.up(self.norm1(h)))))
        logits = self.head(self.norm2(h))  # (batch, seq, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def markov_data(n_train=4000, n_val=600, seed=0) -> TokenData:
    """Token streams from a fixed random Markov chain: learnable, no tokenizer needed."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3 * torch.randn(V, V, generator=g), dim=-1)

    def walk(n):
        out = [0]
        for _ in range(n - 1):
            out.append(torch.multinomial(transition[out[-1]], 1, generator=g).item())
        return torch.tensor(out)

    return TokenData(walk(n_train), walk(n_val), T, token_bytes=torch.ones(V, dtype=torch.long), vocab_size=V)


@pytest.fixture(scope="module")
def data():
    return markov_data()


# ----------------------------------------------------------------------------- schedule, optimizer


def test_lr_schedule_shape():
    m = [lr_at(s, 20, warmup_steps=4, warmdown_steps=5, final_ratio=0.1) for s in range(20)]
    assert m[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up
    assert m[4:15] == [1.0] * 11  # constant
    assert m[15:] == pytest.approx([0.1 + 0.9 * k / 5 for k in (5, 4, 3, 2, 1)])  # linear warm-down
    assert all(a >= b for a, b in zip(m[14:], m[15:]))
    assert [lr_at(s, 5) for s in range(5)] == [1.0] * 5
    for bad in [
        dict(step=0, total_steps=0),
        dict(step=5, total_steps=5),
        dict(step=0, total_steps=5, warmup_steps=3, warmdown_steps=3),
    ]:
        with pytest.raises(ValueError):
            lr_at(**bad)


def torch_warmup_cosine(total_steps, warmup_steps, final_ratio):
    """The multipliers torch's own schedulers give: LinearLR warm-up, then CosineAnnealingLR."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup_steps, 1.0, total_iters=warmup_steps - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps - warmup_steps, eta_min=final_ratio)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[warmup_steps])
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup,final", [(4, 0.0), (3, 0.1), (1, 0.05)])
def test_cosine_schedule_equals_torch_schedulers(warmup, final):
    ours = [lr_at(s, 30, warmup_steps=warmup, final_ratio=final, schedule="cosine") for s in range(30)]
    assert ours == pytest.approx(torch_warmup_cosine(30, warmup, final), abs=1e-12)
    assert ours[warmup] == 1.0 and all(a > b for a, b in zip(ours[warmup:], ours[warmup + 1 :]))
    assert final < ours[-1] < final + 0.01  # the last step is close to, not at, the floor
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, 30, warmup_steps=2, warmdown_steps=5, schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 30, schedule="step")


def test_train_config_cosine_drives_the_loop(data):
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exponential")
    cfg = TrainConfig(steps=12, batch_size=4, warmup_steps=3, schedule="cosine", final_lr_ratio=0.1)
    assert cfg.warmdown_steps == 0  # warmdown_frac belongs to the linear schedule
    torch.manual_seed(0)
    result = train(StandInLM(), data, TrainConfig(**{**cfg.__dict__, "eval_every": 0, "progress": False}))
    assert result["lrs"] == pytest.approx(torch_warmup_cosine(12, 3, 0.1), abs=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_muon_for_hidden_matrices_adamw_for_the_rest(tie):
    model = StandInLM(tie=tie)
    opt = build_optimizer(model)
    muon_ids = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    assert isinstance(opt.optimizers["adamw"], torch.optim.AdamW)
    expected_muon = {id(model.up.weight), id(model.down.weight), id(model.mix.weight)}
    assert muon_ids == expected_muon
    assert adamw_ids == {id(p) for p in model.parameters()} - expected_muon  # each parameter once
    assert id(model.head.weight) in adamw_ids and id(model.tok.weight) in adamw_ids
    names = [n for n, _ in split_parameters(model)[0]]
    assert names == ["up.weight", "down.weight", "mix.weight"]
    # one step moves the Muon matrices exactly as torch's Muon alone would
    reference = StandInLM(tie=tie)
    reference.load_state_dict(model.state_dict())
    ref_muon = torch.optim.Muon(
        [reference.up.weight, reference.down.weight, reference.mix.weight],
        lr=0.02,
        weight_decay=0.0,
        momentum=0.95,
    )
    x = torch.randint(0, V, (2, T))
    for m in (model, reference):
        m.eval()
        m(x, x)[1].backward()
    opt.step()
    ref_muon.step()
    assert torch.equal(model.up.weight, reference.up.weight)
    assert not torch.equal(model.tok.weight, reference.tok.weight)  # AdamW moved the embedding


def test_adamw_only_and_bad_lr():
    opt = build_optimizer(StandInLM(), use_muon=False)
    assert list(opt.optimizers) == ["adamw"]
    with pytest.raises(ValueError, match="learning rates"):
        build_optimizer(StandInLM(), lr=0.0)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="ckpt_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="int8")


# ----------------------------------------------------------------------------- evaluation


class UniformLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, V) + self.dummy, None


def test_bits_per_byte_hand_calculation():
    # Token i encodes i % 4 bytes (token 0, 4, 8, ... encode none, like <|endoftext|>).
    # A uniform model pays ln(V) nats for every token; bpb counts only tokens that encode bytes.
    stream = torch.arange(3 * T + 1) % V
    data = TokenData(stream, stream, T, token_bytes=torch.arange(V) % 4, vocab_size=V)
    result = evaluate(UniformLM(), data, batch_size=2)
    targets = [t for t in stream.tolist()[1 : 3 * T + 1]]  # 3 windows of T, each target = next token
    text_targets = [t for t in targets if t % 4]
    hand_bpb = len(text_targets) * math.log2(V) / sum(t % 4 for t in targets)
    assert result["tokens"] == 3 * T
    assert result["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert result["bpb"] == pytest.approx(hand_bpb, abs=1e-6)


def test_training_learns(data):
    torch.manual_seed(0)
    model = StandInLM()
    before = evaluate(model, data, batch_size=8)["loss"]
    result = train(
        model, data, TrainConfig(steps=40, batch_size=8, warmup_steps=5, eval_every=20, progress=False)
    )
    assert len(result["losses"]) == 40 and result["steps"] == 40
    assert [v["step"] for v in result["val"]] == [20, 40]
    assert result["val_loss"] < before - 1.0  # uniform is ln 32 = 3.47; the chain is far more predictable
    assert result["lrs"][0] == pytest.approx(0.2) and result["lrs"][-1] < 0.1


# ----------------------------------------------------------------------------- checkpoints


def _stop_at(step_to_stop):
    def callback(step, record):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


def test_resume_reproduces_uninterrupted_run_exactly(data, tmp_path):
    cfg = dict(steps=8, batch_size=4, grad_accum=2, warmup_steps=2, eval_every=3, progress=False)
    torch.manual_seed(0)
    straight_model = StandInLM()
    straight = train(straight_model, data, TrainConfig(**cfg, ckpt_dir=str(tmp_path / "a")))

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # "Ctrl-C" after 4 steps: a checkpoint is saved
        train(StandInLM(), data, TrainConfig(**cfg, ckpt_dir=str(tmp_path / "b")), callback=_stop_at(4))
    assert torch.load(tmp_path / "b" / ckpt.STATE, weights_only=True)["step"] == 4

    torch.manual_seed(123)  # a fresh process: other RNG state, other initial weights
    resumed_model = StandInLM()
    resumed = train(resumed_model, data, TrainConfig(**cfg, ckpt_dir=str(tmp_path / "b"), resume=True))
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == straight["losses"]  # bit for bit
    assert resumed["val"] == straight["val"]
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_files_safe_and_verified(tmp_path):
    model = StandInLM(tie=True)
    opt = build_optimizer(model)
    model(torch.randint(0, V, (2, T)), torch.randint(0, V, (2, T)))[1].backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, model, opt, step=7, extra={"note": "x"})
    state = torch.load(tmp_path / ckpt.STATE, weights_only=True)  # no pickled code needed
    assert state["step"] == 7 and state["extra"] == {"note": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [state["weights_file"], ckpt.STATE]  # no temporaries

    other = StandInLM(tie=True)
    other_opt = build_optimizer(other)
    ckpt.load_checkpoint(tmp_path, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other.head.weight is other.tok.weight  # tying survives
    muon_state = other_opt.optimizers["muon"].state_dict()["state"]
    assert torch.equal(
        muon_state[0]["momentum_buffer"], opt.optimizers["muon"].state_dict()["state"][0]["momentum_buffer"]
    )

    weights = tmp_path / state["weights_file"]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load_checkpoint(tmp_path, other)
    (tmp_path / ckpt.STATE).write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(tmp_path, other)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing", other)


def test_rng_state_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    state = ckpt.capture_rng_state({"g": g})
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    ckpt.restore_rng_state(state, {"g": g})
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=g).item(),
    ) == first


# ----------------------------------------------------------------------------- data parallel


DDP_CFG = dict(steps=5, grad_accum=2, warmup_steps=1, eval_every=0, eval_batches=2, progress=False)


def _train_both(batch_size):
    """Train the stand-in twice, with Muon + AdamW and with AdamW alone: (losses, weights) of each."""
    out = {}
    for use_muon in (True, False):
        torch.manual_seed(0)
        model = StandInLM()
        model.drop.p = 0.0  # dropout masks differ per rank by design; compare the arithmetic only
        result = train(model, markov_data(), TrainConfig(batch_size=batch_size, use_muon=use_muon, **DDP_CFG))
        out[use_muon] = {"losses": result["losses"], "state": model.state_dict()}
    return out


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from common.training import cleanup_distributed, setup_distributed

    ctx = setup_distributed("cpu")
    out = _train_both(batch_size=3)
    if ctx.is_main:
        torch.save({str(k): v for k, v in out.items()}, os.path.join(out_dir, "ddp.pt"))
    cleanup_distributed()


def test_two_process_ddp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = _train_both(batch_size=6)  # one process, the same global batch of 6 x 2 accumulation steps

    # AdamW alone: DDP's averaged gradients equal the big batch's up to float summation order
    assert ddp["False"]["losses"] == pytest.approx(single[False]["losses"], abs=1e-5)
    for name, p in single[False]["state"].items():
        torch.testing.assert_close(ddp["False"]["state"][name], p, atol=1e-5, rtol=1e-5, msg=name)
    # Muon orthogonalises in bf16 (torch's choice), where a 1e-7 gradient difference can flip a
    # rounding: the matrices then agree to ~lr * 2^-8 per step, the losses still to 1e-4.
    assert ddp["True"]["losses"] == pytest.approx(single[True]["losses"], abs=1e-4)
    for name, p in single[True]["state"].items():
        torch.testing.assert_close(ddp["True"]["state"][name], p, atol=2e-3, rtol=0, msg=name)


# ----------------------------------------------------------------------------- resume refusals


def _tiny_decoder(**kw):
    from common.models.decoder import DecoderConfig, DecoderLM

    return DecoderLM(
        DecoderConfig(vocab_size=V, context_length=T, n_layer=1, d_model=16, n_head=2, n_kv_head=2, **kw)
    )


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_run(data, tmp_path):
    from common.errors import UsageError

    folder = tmp_path / "none"
    cfg = TrainConfig(steps=4, batch_size=2, eval_every=0, progress=False, ckpt_dir=str(folder), resume=True)
    with pytest.raises(UsageError) as e:
        train(StandInLM(), data, cfg)
    assert str(e.value) == f"resume: no complete checkpoint in {folder} to resume from"
    assert not folder.exists()  # nothing trained, nothing written


def test_resume_names_the_setting_that_differs_and_refuses_steps_already_done(data, tmp_path):
    from common.errors import UsageError

    base = dict(
        batch_size=2, warmup_steps=1, eval_every=0, eval_batches=1, progress=False, ckpt_dir=str(tmp_path)
    )
    train(_tiny_decoder(), data, TrainConfig(steps=3, **base))
    state_before = (tmp_path / ckpt.STATE).read_bytes()
    with pytest.raises(UsageError) as e:
        train(_tiny_decoder(d_ff=32), data, TrainConfig(steps=6, resume=True, **base))
    assert str(e.value) == (
        f"resume: the checkpoint in {tmp_path} has a model with d_ff=None, this run asks for d_ff=32; "
        "keep it, or use another output folder"
    )
    with pytest.raises(UsageError, match="was trained with batch_size=2, this run asks for batch_size=4"):
        train(_tiny_decoder(), data, TrainConfig(steps=6, resume=True, **{**base, "batch_size": 4}))
    for steps in (2, 3):
        with pytest.raises(UsageError) as e:
            train(_tiny_decoder(), data, TrainConfig(steps=steps, resume=True, **base))
        assert str(e.value) == (
            f"resume: the checkpoint in {tmp_path} is at step 3, so steps={steps} leaves nothing to train; "
            "ask for more than 3 steps"
        )
    assert (tmp_path / ckpt.STATE).read_bytes() == state_before  # every refusal left the checkpoint alone
    result = train(_tiny_decoder(), data, TrainConfig(steps=5, resume=True, **base))
    assert result["resumed_from"] == 3 and result["steps"] == 5
