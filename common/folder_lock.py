"""One run per output folder: a lock that the operating system drops when its process ends.

Two runs writing into one ``--out`` would overwrite each other's checkpoints and figures.  A script's
:func:`common.runner.parse_args` takes the lock of its ``--out`` (the file ``.lock`` in it, holding the
process id and command line of the run that holds it); a second run on the same folder is refused with
a one-line error naming that process.  The lock is an advisory lock on the open file (``flock`` on
POSIX, ``msvcrt.locking`` on Windows), so a run that dies, even by SIGKILL, leaves no stale lock behind:
the file stays, the lock does not.  Within one process, taking a folder's lock again is a no-op;
:func:`release` and :func:`release_all` give locks back (the runner does at the end of a script), and
a folder that the lock created and nothing else wrote into is removed again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.errors import UsageError

LOCK_NAME = ".lock"
_held: dict[str, tuple[int, list[Path]]] = {}  # real path -> (the lock file's descriptor, folders made)


class FolderInUse(UsageError):
    """Another live process holds the folder's lock."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and take its lock; :class:`FolderInUse` if another process holds it."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        return folder
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        try:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
        except OSError:  # Windows: the holder's locked byte cannot be read
            holder = "another process"
        finally:
            os.close(fd)
        _remove_if_empty(folder, made)
        raise FolderInUse(f"{folder} is in use by {holder}; wait for that run to end or choose another --out")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"process {os.getpid()} ({' '.join(sys.argv)})\n".encode())
    _held[key] = (fd, made)
    return folder


def _remove_if_empty(folder: Path, made: list[Path]) -> None:
    """Remove the lock file and the folders the lock made, where nothing else was written."""
    if made and folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        for path in made:
            try:
                path.rmdir()
            except OSError:  # not empty: something else lives there
                break


def release(folder: str | os.PathLike) -> None:
    """Give the folder's lock back (the file stays: removing it would race with a run taking it)."""
    held = _held.pop(os.path.realpath(folder), None)
    if held is not None:
        fd, made = held
        os.close(fd)  # closing the descriptor drops the lock
        _remove_if_empty(Path(folder), made)


def release_all() -> None:
    """Give back every lock this process holds."""
    for key in list(_held):
        release(key)
