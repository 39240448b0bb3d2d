"""The runner every section script hands its ``main`` to.

A section script looks like this::

    from common.runner import script_parser, parse_args, run_script

    def main(argv=None) -> dict:
        parser = script_parser(__doc__)
        parser.add_argument("--steps", type=int, default=200, help="training steps")
        args = parse_args(parser, argv)       # seeds, resolves --device, applies quick mode
        ...
        return {"val_loss": 1.23}             # flat dict of JSON-able figures

    if __name__ == "__main__":
        run_script(main)

Shared flags: ``--quick`` (also on when the environment variable ``BOOK_QUICK`` is 1/true/yes),
``--device auto|cpu|cuda|mps``, ``--seed``, ``--json PATH``.  ``run_script`` captures Python
warnings (still printing them), prints the returned figures as a short table, writes
``{"status", "reason", "figures", "warnings"}`` to ``--json`` and maps :class:`SkipScript` to
exit code 77, which the ``verify`` harness records as SKIP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

SKIP_EXIT_CODE = 77
QUICK_ENV = "BOOK_QUICK"


class SkipScript(Exception):
    """Raised by a script that cannot run here (no GPU, an optional package missing or broken)."""

    def __init__(self, reason: str, hint: str = ""):
        self.reason = reason
        self.hint = hint
        super().__init__(f"{reason} ({hint})" if hint else reason)


def quick_from_env() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("common flags (every section script)")
    g.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes that finish in seconds on 2 CPU cores (also: {QUICK_ENV}=1)",
    )
    g.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run; auto picks cuda, then mps, then cpu",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
    g.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for plots, checkpoints and other outputs (default runs/<script name>/)",
    )
    g.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write the returned figures, status and warnings as JSON to PATH",
    )
    return parser


def script_parser(doc: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An argparse parser with the shared flags; ``doc`` (the module docstring) is its help text."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(description=doc, **kwargs)
    return add_common_args(parser)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``, turn on quick mode from the environment, seed everything, keep freed memory for
    reuse (:func:`common.env.keep_freed_memory`) and pick the device.

    ``args.device`` becomes the chosen device name ("cpu", "cuda", "mps"); ``args.device_reason``
    says why.  Asking for cuda or mps where there is none raises :class:`SkipScript`.  ``args.out``
    defaults to ``runs/<name of the calling script>`` (created by whoever writes there first).
    """
    from common import env

    args = parser.parse_args(argv)
    if args.out is None:
        caller = sys._getframe(1).f_globals.get("__file__") or "script"
        args.out = os.path.join("runs", os.path.splitext(os.path.basename(caller))[0])
    args.quick = bool(args.quick or quick_from_env())
    env.seed_everything(args.seed)
    env.keep_freed_memory()  # large CPU tensors reuse freed pages instead of page-faulting anew
    args.device, args.device_reason = env.choose_device(args.device)
    return args


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) and math.isfinite(v):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


FIGURES_HEADING = "figures"  # the line above the figures table (verify.samples cuts a log there)


def print_figures(figures: dict) -> None:
    if not figures:
        return
    width = max(len(str(k)) for k in figures)
    print(f"\n{FIGURES_HEADING}")
    print("-" * (width + 20))
    for k, v in figures.items():
        print(f"{str(k):<{width}}  {_format_value(v)}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def write_json(path: str, payload: dict) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(_jsonable(payload), f, indent=2)
    os.replace(tmp, path)


def run_script(main: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> None:
    """Run a section script's ``main`` and exit: 0 done, 77 skipped, 1 failed, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    pre = add_common_args(argparse.ArgumentParser(add_help=False))
    known, _ = pre.parse_known_args(argv)

    captured: list[str] = []
    original_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        captured.append(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")
        original_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    status, reason, figures, code = "PASS", "", {}, 0
    start = time.perf_counter()
    try:
        figures = main(argv) or {}
        if not isinstance(figures, dict):
            raise TypeError(f"main() must return a dict of figures, got {type(figures).__name__}")
    except SkipScript as e:
        status, reason, code = "SKIP", str(e), SKIP_EXIT_CODE
        print(f"\nSKIP: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        status, reason, code = "FAIL", "interrupted", 130
        print("\ninterrupted", file=sys.stderr)
    except SystemExit as e:  # argparse --help / bad flags
        if e.code in (0, None):
            raise
        status, reason, code = "FAIL", f"exit {e.code}", int(e.code) if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - the report needs every failure
        traceback.print_exc()
        status, reason, code = "FAIL", f"{type(e).__name__}: {e}", 1
    finally:
        warnings.showwarning = original_showwarning
    seconds = time.perf_counter() - start
    if status == "PASS":
        print_figures(figures)
    if known.json:
        write_json(
            known.json,
            {
                "status": status,
                "reason": reason,
                "seconds": seconds,
                "figures": figures,
                "warnings": captured,
            },
        )
    sys.stdout.flush()
    sys.exit(code)
