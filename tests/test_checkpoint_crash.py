"""common.checkpoint under faults: a crash at every step of save_checkpoint, half-written files, and a
real process killed while it saves.  At every instant one complete checkpoint loads, and the next
save or load leaves no temporary or orphaned file behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import torch

from common import checkpoint as ckpt
from tests.conftest import REPO_ROOT


class Crash(Exception):
    """Stands for the process dying at that instant."""


def model_with(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def loaded(directory) -> tuple[int, float]:
    """(step, weight value) of the checkpoint that loads from ``directory``."""
    target = torch.nn.Linear(4, 3)
    state = ckpt.load_checkpoint(directory, target)
    assert torch.all(target.weight == target.weight.flatten()[0]) and torch.equal(
        target.bias, torch.full((3,), target.weight.flatten()[0].item())
    )
    return state["step"], target.weight.flatten()[0].item()


def only_checkpoint_files(directory) -> bool:
    state = torch.load(directory / ckpt.STATE, weights_only=True)
    return sorted(p.name for p in directory.iterdir()) == sorted([ckpt.STATE, state["weights_file"]])


# every operation save_checkpoint performs, by (object, attribute) to patch
OPERATIONS = [
    (safetensors.torch, "save_model"),
    (ckpt, "_fsync"),
    (ckpt, "file_sha256"),
    (os, "replace"),
    (torch, "save"),
    (ckpt, "_tidy"),
]


def save_with_crash(monkeypatch, directory, model, step, crash_at: int, after: bool) -> bool:
    """Save, dying at the ``crash_at``-th operation (before it runs or just ``after``); True if done."""
    calls = {"n": 0}

    def wrap(original):
        def op(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at and not after:
                raise Crash
            result = original(*args, **kwargs)
            if calls["n"] == crash_at and after:
                raise Crash
            return result

        return op

    with monkeypatch.context() as m:
        for owner, name in OPERATIONS:
            m.setattr(owner, name, wrap(getattr(owner, name)))
        try:
            ckpt.save_checkpoint(directory, model, step=step)
        except Crash:
            return False
    return True


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_crash_at_every_step_of_a_save_leaves_one_loadable_checkpoint(monkeypatch, tmp_path, after):
    outcomes = []
    for crash_at in range(1, 30):
        directory = tmp_path / f"{after}-{crash_at}"
        ckpt.save_checkpoint(directory, model_with(1.0), step=1)
        finished = save_with_crash(monkeypatch, directory, model_with(2.0), 2, crash_at, after)
        step_value = loaded(directory)  # whatever instant it died at, a complete checkpoint loads
        assert step_value in {(1, 1.0), (2, 2.0)}
        assert only_checkpoint_files(directory)  # the load removed what the crash left
        outcomes.append(step_value)
        if finished:
            assert step_value == (2, 2.0)
            break
    else:
        pytest.fail("save_checkpoint never finished")
    # the old checkpoint survives every crash up to the one rename that switches to the new
    switch = outcomes.index((2, 2.0))
    assert outcomes[:switch] == [(1, 1.0)] * switch and switch >= 5


def test_half_written_files_never_replace_the_checkpoint(monkeypatch, tmp_path):
    ckpt.save_checkpoint(tmp_path, model_with(1.0), step=1)

    def half_a_torch_file(obj, path, *a, **k):
        open(path, "wb").write(b"PK\x03\x04 half a zip")
        raise Crash

    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(torch, "save", half_a_torch_file)
        ckpt.save_checkpoint(tmp_path, model_with(2.0), step=2)
    assert loaded(tmp_path) == (1, 1.0) and only_checkpoint_files(tmp_path)

    def half_the_weights(model, path, *a, **k):
        open(path, "wb").write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
        raise Crash

    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(safetensors.torch, "save_model", half_the_weights)
        ckpt.save_checkpoint(tmp_path, model_with(3.0), step=3)
    assert loaded(tmp_path) == (1, 1.0) and only_checkpoint_files(tmp_path)
    ckpt.save_checkpoint(tmp_path, model_with(4.0), step=4)
    assert loaded(tmp_path) == (4, 4.0) and only_checkpoint_files(tmp_path)


def test_edited_weights_or_state_are_refused_with_the_reason(tmp_path):
    ckpt.save_checkpoint(tmp_path, model_with(1.0), step=1)
    weights = tmp_path / torch.load(tmp_path / ckpt.STATE, weights_only=True)["weights_file"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    with pytest.raises(ckpt.CheckpointError, match="does not match the checksum"):
        loaded(tmp_path)
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match="is missing"):
        loaded(tmp_path)
    assert not ckpt.has_checkpoint(tmp_path)


SAVER = textwrap.dedent("""
    import sys, torch
    from common import checkpoint as ckpt
    directory, ready = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(256, 256)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step)); model.bias.fill_(float(step))
        ckpt.save_checkpoint(directory, model, step=step)
        if step == 2:
            open(ready, "w").close()
""")


def test_a_process_killed_while_it_saves_leaves_a_loadable_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    for delay in (0.0, 0.013, 0.031):
        ready = tmp_path / f"ready{delay}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(directory), str(ready)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the worst case
        proc.wait(timeout=30)
        target = torch.nn.Linear(256, 256)
        state = ckpt.load_checkpoint(directory, target)
        assert state["step"] >= 2 and torch.all(target.weight == float(state["step"]))
        assert only_checkpoint_files(directory)
