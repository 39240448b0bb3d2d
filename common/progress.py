"""Progress on long work: a tqdm bar on a terminal, plain periodic lines in logs and pipes.

    from common.progress import progress

    for batch in progress(batches, desc="train"):            # or progress(total=steps, desc="train")
        ...

On a terminal this is ``tqdm`` (the bar redraws itself in place).  Where the output is not a
terminal (a log file, a pipe, the ``verify`` harness) a bar's carriage-return frames would pile up
in the file, so :class:`LineProgress` prints one plain line each tenth of the way instead::

    train: 16/160 (10%) 3 s loss=3.210, lr=1.00

Both take the same calls: iteration, ``update``, ``set_postfix``, ``write``, ``close``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable


class LineProgress:
    """The plain-lines stand-in for a tqdm bar: a line every ``total / lines`` steps and at the end."""

    def __init__(self, iterable=None, total=None, desc="", initial=0, lines=10, file=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.n, self.file = total, desc, initial, file or sys.stderr
        self.every = max(1, math.ceil(total / lines)) if total else 100
        self.postfix, self.start, self.closed = "", time.perf_counter(), False
        self._next = (initial // self.every + 1) * self.every

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or (self.total is not None and self.n >= self.total):
            self._line()
            self._next = (self.n // self.every + 1) * self.every

    def _line(self) -> None:
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        post = f" {self.postfix}" if self.postfix else ""
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {done} {elapsed:.0f} s{post}", file=self.file, flush=True)

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        self.closed = True


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    disable: bool = False,
    initial: int = 0,
    file=None,
    **tqdm_kwargs,
):
    """A tqdm bar where ``file`` (default stderr) is a terminal, else a :class:`LineProgress`."""
    from tqdm.auto import tqdm

    file = file or sys.stderr
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if getattr(file, "isatty", lambda: False)():
        return tqdm(
            iterable, total=total, desc=desc, initial=initial, file=file, dynamic_ncols=True, **tqdm_kwargs
        )
    return LineProgress(iterable, total=total, desc=desc, initial=initial, file=file)


def progress_if(iterable: Iterable, desc: str, enabled: bool) -> Iterable:
    """``progress(iterable, desc=desc)`` when ``enabled``, else the iterable itself."""
    return progress(iterable, desc=desc) if enabled else iterable
