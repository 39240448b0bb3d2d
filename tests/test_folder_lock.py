"""One run per output folder (common.folder_lock): a second run on a folder in use is refused with one
line naming the first, the lock dies with its process (SIGKILL included), and a checkpoint's tidy-up
never removes another live process's temporaries."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from common import checkpoint as ckpt
from common.folder_lock import FolderInUse, lock_folder, release, release_all
from tests.conftest import REPO_ROOT

HOLDER = textwrap.dedent("""
    import sys, time
    from common.folder_lock import lock_folder
    lock_folder(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")

SCRIPT = textwrap.dedent('''
    """Writes into its --out, slowly."""
    import os, time
    from common.runner import parse_args, run_script, script_parser

    def main(argv=None):
        args = parse_args(script_parser(__doc__), argv)
        open(os.path.join(args.out, "started"), "w").close()
        time.sleep(float(os.environ.get("HOLD_SECONDS", "0")))
        return {}

    if __name__ == "__main__":
        run_script(main)
''')


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _hold(folder):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_held_by_another_process_is_refused_until_that_process_dies(tmp_path):
    holder = _hold(tmp_path / "out")
    try:
        with pytest.raises(FolderInUse, match=rf"in use by process {holder.pid} "):
            lock_folder(tmp_path / "out")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock_folder(tmp_path / "out")  # SIGKILL left no stale lock
    lock_folder(tmp_path / "out")  # taking it again in the same process is a no-op
    release(tmp_path / "out")


def test_a_lock_on_a_folder_nothing_was_written_into_leaves_nothing(tmp_path):
    target = tmp_path / "runs" / "a"
    lock_folder(target)
    assert (target / ".lock").is_file()
    release_all()
    assert not (tmp_path / "runs").exists()
    lock_folder(target)
    (target / "figures.json").write_text("{}")
    release_all()
    assert (target / "figures.json").is_file()  # what the run wrote stays, with the lock file


def test_a_second_run_on_the_same_out_gets_a_one_line_usage_error_naming_the_first(tmp_path):
    script = tmp_path / "s_slow.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, str(script), "--out", str(out)], env=_env() | {"HOLD_SECONDS": "60"}
    )
    try:
        deadline = time.time() + 60
        while not (out / "started").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, str(script), "--out", str(out)], env=_env(), capture_output=True, text=True
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]  # after argparse's usage lines
    assert line.startswith("s_slow.py: error: argument --out: ")
    assert f"{out} is in use by process {first.pid} " in line
    again = subprocess.run([sys.executable, str(script), "--out", str(out)], env=_env(), capture_output=True)
    assert again.returncode == 0  # free once the first has ended


def test_the_checkpoint_tidy_up_keeps_a_live_processs_temporaries(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    try:
        live_tmp = tmp_path / f"state.pt.tmp{other.pid}"
        dead_tmp = tmp_path / f"state.pt.tmp{int(dead.stdout)}"
        live_tmp.write_bytes(b"being written")
        dead_tmp.write_bytes(b"left by a crash")
        ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), step=1)
        assert live_tmp.exists() and not dead_tmp.exists()
        assert ckpt.has_checkpoint(tmp_path)
    finally:
        other.kill()
        other.wait()
