"""Chapter 6's training scripts under a real SIGTERM or SIGINT: the checkpoint is saved and loads, the
figures JSON says INTERRUPTED with the step and the resume command, and that command continues the
run.  s6_4_3 checkpoints its language model in the parent process; s6_4_4 trains in two worker
processes (DeepSpeed, ep_size 2) that the parent ends, each rank having saved its shard per epoch."""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import checkpoint as ckpt
from tests.conftest import REPO_ROOT


def _env():
    return {**{k: v for k, v in os.environ.items() if k != "BOOK_QUICK"}, "PYTHONPATH": str(REPO_ROOT)}


def _start(module, flags):
    return subprocess.Popen(
        [sys.executable, "-m", module, *flags],
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(paths, proc, seconds=600):
    """Until every path (a glob pattern: a run may have moved on to its next epoch already) exists."""
    deadline = time.time() + seconds
    while not all(glob.glob(str(p)) for p in paths):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never saved a checkpoint"
        time.sleep(0.1)


def _interrupted(proc, sig, figures, module, flags):
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    payload = json.loads(figures.read_text())
    assert payload["status"] == "INTERRUPTED" and payload["step"] >= 1
    expected = shlex.join(["python", "-m", module, *flags, "--resume"])
    assert payload["resume"] == expected
    assert stderr.strip().splitlines()[-1].endswith(f"resume with: {expected}")
    return payload


def _resume(payload, more):
    command = [sys.executable, *shlex.split(payload["resume"])[1:], *more]
    done = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_s6_4_3_language_model_is_saved_on_a_signal_and_resumes(tmp_path, sig):
    from ch06_distributed_moe.s6_4_3_fastmoe_transformer import MoETransformer
    from common.fmoe.backend import fmoe_backend

    module = "ch06_distributed_moe.s6_4_3_fastmoe_transformer"
    out, figures = tmp_path / "out", tmp_path / "figures.json"
    flags = ["--quick", "--nproc", "1", "--lm-steps", "100000", "--ckpt-every", "2"]
    flags += ["--out", str(out), "--json", str(figures)]
    proc = _start(module, flags)
    _wait_for([out / "checkpoint" / "state.pt"], proc)
    payload = _interrupted(proc, sig, figures, module, flags)
    step = payload["step"]
    assert payload["checkpoint"] == str(out / "checkpoint")
    state = ckpt.read_state(out / "checkpoint")
    assert state["step"] == step  # the step the interruption reported is the one saved
    fm, _ = fmoe_backend()
    model = MoETransformer(fm, 2, 64, 4, 8, 128, 2, vocab=2048, context=64)  # --quick's sizes
    ckpt.load_checkpoint(out / "checkpoint", model, torch.optim.AdamW(model.parameters()))  # strict
    if sig != signal.SIGTERM:
        return  # one resume proves the command
    module_flags = [sys.executable, "-m", module, *flags, "--resume"]
    for bad, message in (
        (["--lm-lr", "0.5"], "was trained with --lm-lr 0.003, this run asks for 0.5"),
        (["--seed", "7"], "was trained with --seed 0"),
        (["--experts", "2"], "was trained with --experts 8"),
        (["--lm-steps", str(step)], f"is at step {step}, so --lm-steps {step} leaves nothing to train"),
    ):
        refused = subprocess.run([*module_flags, *bad], env=_env(), capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1], refused.stderr
    _resume(payload, ["--lm-steps", str(step + 2)])
    resumed = json.loads(figures.read_text())
    assert resumed["status"] == "PASS" and resumed["figures"]["lm_resumed_from"] == step
    assert ckpt.read_state(out / "checkpoint")["step"] == step + 2


@pytest.mark.slow
def test_s6_4_4_two_workers_save_their_shards_and_resume_after_sigterm(tmp_path):
    pytest.importorskip("deepspeed")
    from ch06_distributed_moe.s6_4_4_deepspeed_training import saved_epoch, shard_dir

    module = "ch06_distributed_moe.s6_4_4_deepspeed_training"
    out, figures = tmp_path / "out", tmp_path / "figures.json"
    flags = ["--quick", "--epochs", "100000", "--batches", "2", "--out", str(out), "--json", str(figures)]
    proc = _start(module, flags)
    first = [out / "checkpoint" / "epoch*" / f"rank{r}" / "state.pt" for r in range(2)]  # epoch1 may be gone
    _wait_for(first, proc)
    payload = _interrupted(proc, signal.SIGTERM, figures, module, flags)
    epoch = payload["step"]
    assert payload["checkpoint"] == str(out / "checkpoint")
    assert saved_epoch(str(out / "checkpoint"), 2) == epoch
    states = [ckpt.read_state(shard_dir(str(out / "checkpoint"), epoch, r)) for r in range(2)]
    assert [s["step"] for s in states] == [epoch, epoch]  # one epoch on both ranks
    assert all(len(s["extra"]["epochs"]) == epoch for s in states)
    for bad, message in (
        (["--lr", "0.5"], "was trained with --lr 0.001, this run asks for 0.5"),
        (["--seed", "7"], "was trained with --seed 0"),
        (["--experts", "2"], "was trained with --experts 4"),
        (["--nproc", "1"], "was trained with --nproc 2, this run asks for 1"),
        (["--epochs", str(epoch)], f"is at epoch {epoch}, so --epochs {epoch} leaves nothing to train"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", module, *flags, "--resume", *bad],
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and message in refused.stderr.strip().splitlines()[-1], refused.stderr
    _resume(payload, ["--epochs", str(epoch + 1)])
    resumed = json.loads(figures.read_text())
    assert resumed["status"] == "PASS" and resumed["figures"]["resumed_from"] == epoch
    assert [p.name for p in (out / "checkpoint").iterdir()] == [f"epoch{epoch + 1}"]  # the older one went


def test_s6_4_4_keeps_the_last_epoch_that_every_rank_saved(tmp_path):
    """A machine that died between rank 0's and rank 1's save of epoch 3: epoch 2 is still whole."""
    from ch06_distributed_moe.s6_4_4_deepspeed_training import remove_shard, saved_epoch, shard_dir

    model = torch.nn.Linear(2, 2)
    for epoch, ranks in ((2, (0, 1)), (3, (0,))):
        for r in ranks:
            ckpt.save_checkpoint(shard_dir(str(tmp_path), epoch, r), model, step=epoch)
    assert saved_epoch(str(tmp_path), 2) == 2
    remove_shard(str(tmp_path), 3, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch2"]
