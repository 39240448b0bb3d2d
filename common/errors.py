"""How a section script stops short of its work; shared by :mod:`common.runner` and :mod:`common.env`.

- :class:`SkipScript`: the script cannot run here (no GPU, an optional package missing or broken);
  the runner exits with :data:`SKIP_EXIT_CODE` and the ``verify`` harness records SKIP.
- :class:`UsageError`: a flag, a path, a file or a checkpoint that cannot work, found before the
  work starts; the runner prints its message as one line (no traceback) and exits with
  :data:`USAGE_EXIT_CODE`, like argparse's usage errors;
- :class:`Interrupted`: SIGTERM, which the runner turns into the path Ctrl-C takes;
- :class:`ChecksPassed`: ``--check-only`` and every check held; the runner exits 0 before the work.
"""

from __future__ import annotations

SKIP_EXIT_CODE = 77
USAGE_EXIT_CODE = 2


class SkipScript(Exception):
    """Raised by a script that cannot run here (no GPU, an optional package missing or broken)."""

    def __init__(self, reason: str, hint: str = ""):
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason} ({hint})" if hint else reason)


class UsageError(ValueError):
    """A bad flag, path, file or checkpoint: the message says which and what is wrong, in one line."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into the same path as Ctrl-C (``KeyboardInterrupt``): checkpoints saved, figures kept.

    ``signum`` is the signal that arrived; the runner exits with ``128 + signum`` (143 for SIGTERM).
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")


class ChecksPassed(Exception):
    """Raised by :func:`common.runner.checks_done` under ``--check-only``: the flags, paths, model and data
    were checked and the work would start now."""
