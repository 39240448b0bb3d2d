"""A section script in a process group of its own, ended as a whole, on POSIX and on Windows.

The harness runs each script as the leader of a new group, so that a time limit or an interrupt ends
the script and every worker it started, and it reads the script's peak memory once it has exited.

- POSIX: ``start_new_session=True``; the clean stop is SIGTERM to the group (``os.killpg``), which the
  runner turns into its Ctrl-C path; the hard stop is SIGKILL to the group; the script is reaped with
  ``os.wait4``, whose ``ru_maxrss`` is its peak resident memory (KiB on Linux, bytes on macOS).
- Windows has neither process groups of that kind, ``killpg``, SIGKILL nor ``wait4``: the script
  starts with ``CREATE_NEW_PROCESS_GROUP``; the clean stop is ``CTRL_BREAK_EVENT`` to that group (the
  runner handles SIGBREAK as SIGTERM); the hard stop is ``kill()`` (TerminateProcess) of the script and
  of every descendant psutil finds; it is reaped with ``poll()``, and its peak memory is psutil's
  ``peak_wset``, read while it runs (psutil is optional: without it the peak is 0 and children that
  left the group survive a hard stop).

``sys.platform`` is read at each call, so tests force the Windows branch on Linux.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def on_windows() -> bool:
    return sys.platform == "win32"


def popen_options() -> dict:
    """``subprocess.Popen`` keywords that make the child the leader of a new process group."""
    if on_windows():
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone
        return []


class ScriptProcess:
    """A started script: :meth:`poll` until it has exited, :meth:`stop` to end it and its children."""

    def __init__(self, cmd: list[str], **popen_kwargs):
        self.proc = subprocess.Popen(cmd, **popen_kwargs, **popen_options())
        self.peak_rss_mb = 0.0

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> bool:
        """Whether the script has exited (then reaped: ``returncode`` and ``peak_rss_mb`` are set)."""
        if self.proc.returncode is not None:
            return True
        if on_windows():
            self._sample_peak()
            return self.proc.poll() is not None
        pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid != self.proc.pid:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        self.peak_rss_mb = round(rusage.ru_maxrss * scale / 2**20, 1)
        return True

    def wait(self) -> int:
        """Block until the script has exited; its exit code."""
        while not self.poll():
            time.sleep(0.05)
        return self.proc.returncode

    def _sample_peak(self) -> None:
        try:
            import psutil

            info = psutil.Process(self.proc.pid).memory_info()
        except Exception:  # noqa: BLE001 - psutil missing or the process gone
            return
        peak = getattr(info, "peak_wset", info.rss)  # Windows' peak working set; rss elsewhere
        self.peak_rss_mb = max(self.peak_rss_mb, round(peak / 2**20, 1))

    def _signal_group(self, hard: bool) -> None:
        if on_windows():
            if hard:
                self.proc.kill()
            else:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)  # reaches every process of the group
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 5.0) -> None:
        """End the script's group and any descendant that left it: the clean stop, then after
        ``grace`` seconds the hard one; returns once all of them have exited or the hard stop's 5 s
        are up."""
        descendants = _descendants(self.proc.pid)
        for hard, seconds in ((False, grace), (True, 5.0)):
            self._signal_group(hard)
            for child in descendants:
                _signal_child(child, hard)
            if _wait_until(seconds, lambda: self.poll() and not any(_alive(c) for c in descendants)):
                return


def _signal_child(child, hard: bool) -> None:
    """A descendant (psutil) that may have left the group: SIGTERM or a kill on POSIX; on Windows only
    the kill (the group's CTRL_BREAK_EVENT reached those that stayed in it)."""
    try:
        if hard:
            child.kill()
        elif not on_windows():
            child.send_signal(signal.SIGTERM)
    except Exception:  # noqa: BLE001 - gone already
        pass


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:  # noqa: BLE001
        return False


def _wait_until(seconds: float, done) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.05)
    return done()
