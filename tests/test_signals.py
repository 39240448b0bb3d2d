"""SIGTERM and SIGINT sent to real script processes: the checkpoint is saved, the figures JSON says
INTERRUPTED, one line gives the command that resumes, and that command continues the run; the verify
harness's time limit takes the same path; workers started by common.launch end with their parent."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from common import checkpoint as ckpt
from tests.conftest import REPO_ROOT

TRAINER = textwrap.dedent('''
    """A tiny training run that goes on until it is stopped."""
    import os, time
    import torch
    from common.data import TokenData
    from common.models.decoder import DecoderConfig, DecoderLM
    from common.runner import parse_args, run_script, script_parser
    from common.training import TrainConfig, train

    def main(argv=None):
        parser = script_parser(__doc__)
        parser.add_argument("--steps", type=int, default=100000)
        parser.add_argument("--resume", action="store_true")
        parser.add_argument("--ready", default=None, help="touch this file after step 3")
        args = parse_args(parser, argv)
        g = torch.Generator().manual_seed(0)
        data = TokenData(
            torch.randint(0, 32, (2000,), generator=g), torch.randint(0, 32, (400,), generator=g), 8,
            torch.ones(32, dtype=torch.long), 32,
        )
        model = DecoderLM(DecoderConfig(vocab_size=32, context_length=8, n_layer=1, d_model=16, n_head=2,
                                        n_kv_head=2))
        cfg = TrainConfig(steps=args.steps, batch_size=4, warmup_steps=1, eval_every=0, eval_batches=1,
                          ckpt_dir=os.path.join(args.out, "ckpt"), resume=args.resume, progress=False)

        def callback(step, record):
            if args.ready and step == 3:
                open(args.ready, "w").close()
            time.sleep(0.02)

        result = train(model, data, cfg, callback=callback)
        return {"steps": result["steps"], "resumed_from": result["resumed_from"]}

    if __name__ == "__main__":
        run_script(main)
''')


def _env():
    return {**{k: v for k, v in os.environ.items() if k != "BOOK_QUICK"}, "PYTHONPATH": str(REPO_ROOT)}


def _wait_for(path, proc, seconds=120):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the child never got going"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_signal_saves_the_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    script = tmp_path / "s_train.py"
    script.write_text(TRAINER)
    out, figures, ready = tmp_path / "out", tmp_path / "figures.json", tmp_path / "ready"
    flags = ["--out", str(out), "--json", str(figures), "--ready", str(ready)]
    proc = subprocess.Popen(
        [sys.executable, str(script), *flags],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(ready, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr

    payload = json.loads(figures.read_text())
    step = payload["step"]
    assert payload["status"] == "INTERRUPTED" and step >= 3
    assert payload["checkpoint"] == str(out / "ckpt")
    expected = shlex.join(["python", str(script), *flags, "--resume"])
    assert payload["resume"] == expected
    name = signal.Signals(sig).name
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted by {name} at step {step}; checkpoint in {out / 'ckpt'}; resume with: {expected}"
    )
    assert ckpt.read_state(out / "ckpt")["step"] == step  # the checkpoint is the step reported

    if sig != signal.SIGTERM:
        return  # one resume is enough to prove the command
    # the printed command resumes (here for three more steps)
    command = [sys.executable, *shlex.split(payload["resume"])[1:], "--steps", str(step + 3)]
    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    payload = json.loads(figures.read_text())
    assert payload["status"] == "PASS"
    assert payload["figures"] == {"steps": step + 3, "resumed_from": step}


@pytest.mark.slow
def test_the_harness_time_limit_saves_the_checkpoint_before_the_kill(tmp_path):
    chapter = tmp_path / "book" / "ch99_fake"
    chapter.mkdir(parents=True)
    (chapter / "s1_1_train.py").write_text(TRAINER)
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        "-m",
        "verify",
        "--root",
        str(tmp_path / "book"),
        "--out",
        str(out),
        "--timeout",
        "15",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    (entry,) = json.loads((out / "report.json").read_text())["scripts"]
    assert entry["status"] == "TIMEOUT"
    assert entry["exit_code"] == 143  # ended by SIGTERM through the runner, not SIGKILL
    assert (
        "stopped after 15 s; checkpoint saved, resume with: python -m ch99_fake.s1_1_train" in entry["reason"]
    )
    state = ckpt.read_state(tmp_path / "book" / "runs" / "s1_1_train" / "ckpt")
    assert state["step"] > 0


WORKERS = textwrap.dedent('''
    """Two workers that wait forever."""
    import os, sys, time
    from common.launch import run_workers
    from common.runner import parse_args, run_script, script_parser

    def wait_forever(ctx, pid_dir):
        # a stand-in for the buffer DeepSpeed's CPU all-reduce maps, under the name it gives it
        port = os.environ["MASTER_PORT"]
        shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{ctx.rank}"
        open(shm, "w").close()
        with open(os.path.join(pid_dir, str(os.getpid())), "w") as f:
            f.write(shm)
        time.sleep(600)

    def main(argv=None):
        parser = script_parser(__doc__)
        parser.add_argument("--pids", default=os.environ.get("PIDS_DIR"))
        args = parse_args(parser, argv)
        run_workers(wait_forever, nproc=2, args=(args.pids,), timeout=600)
        return {}

    if __name__ == "__main__":
        run_script(main)
''')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _start_workers(tmp_path):
    """The two-worker script, started; returns (process, {worker pid: its shm file}) once both wait."""
    script = tmp_path / "s_workers.py"
    script.write_text(WORKERS)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), "--pids", str(pids), "--json", str(tmp_path / "f.json")]
        + ["--out", str(tmp_path / "out")],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while len([p for p in pids.iterdir() if p.stat().st_size]) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc, {int(p.name): p.read_text() for p in pids.iterdir()}


def _gone_within(seconds: float, workers: dict) -> bool:
    deadline = time.time() + seconds
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_and_their_shared_memory_end_with_the_parent(tmp_path, sig):
    proc, workers = _start_workers(tmp_path)
    assert all(os.path.exists(shm) for shm in workers.values())
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else -9)
    if sig == signal.SIGTERM:
        assert json.loads((tmp_path / "f.json").read_text())["status"] == "INTERRUPTED"
    # SIGKILL: nothing of the parent runs; the workers notice it is gone (their watchdog) and end
    assert _gone_within(10, workers)
    assert not any(os.path.exists(shm) for shm in workers.values())


@pytest.mark.slow
def test_sigterm_to_the_harness_ends_the_running_script_and_its_workers_and_records_it(tmp_path):
    chapter = tmp_path / "book" / "ch99_fake"
    chapter.mkdir(parents=True)
    (chapter / "s1_1_workers.py").write_text(WORKERS)
    (chapter / "s1_2_later.py").write_text("raise SystemExit('the harness ran on after SIGTERM')\n")
    pids, out = tmp_path / "pids", tmp_path / "report"
    pids.mkdir()
    cmd = [sys.executable, "-m", "verify", "--root", str(tmp_path / "book"), "--out", str(out)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=_env() | {"PIDS_DIR": str(pids)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while len([p for p in pids.iterdir() if p.stat().st_size]) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    workers = {int(p.name): p.read_text() for p in pids.iterdir()}
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    (entry,) = json.loads((out / "report.json").read_text())["scripts"]
    assert entry["status"] == "FAIL"
    assert entry["reason"] == "interrupted: the harness was stopped by SIGTERM"
    assert entry["exit_code"] == 143  # the script's own clean stop, within the grace period
    assert entry["peak_rss_mb"] > 0
    assert _gone_within(10, workers)
    assert not any(os.path.exists(shm) for shm in workers.values())
