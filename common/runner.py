"""The runner every section script hands its ``main`` to.

A section script looks like this::

    from common.runner import checks_done, count_int, parse_args, run_script, script_parser

    def main(argv=None) -> dict:
        parser = script_parser(__doc__)
        parser.add_argument("--steps", type=count_int, default=200, help="training steps")
        args = parse_args(parser, argv)       # seeds, resolves --device, applies quick mode
        ...                                   # the checks that need the model or the data
        checks_done(args)                     # --check-only stops here
        ...
        return {"val_loss": 1.23}             # flat dict of JSON-able figures

    if __name__ == "__main__":
        run_script(main)

Shared flags: ``--quick`` (also on when the environment variable ``BOOK_QUICK`` is 1/true/yes),
``--device auto|cpu|cuda|mps``, ``--seed`` (0 to 2**32-1), ``--out DIR``, ``--json PATH``, ``--check-only``;
every numeric flag takes one of the range-checked types below (``positive_int``, ``float_between``...),
whose range its help shows; a script that
trains or decodes a model adds ``--dtype`` with :func:`add_dtype_flag` (default from ``BOOK_DTYPE``, else
auto: bf16 on a GPU that has it, fp32 on a CPU, so that reports compare across machines).  One parser
reads them all; the output targets are checked before the work starts (a folder given as ``--json``,
an ``--out`` that cannot be written are usage errors, exit 2).  ``run_script`` captures Python
warnings (still printing them), prints the returned figures as a short table, writes
``{"status", "reason", "seconds", "figures", "warnings"}`` to ``--json`` and exits with:

- 0 done (PASS), or, under ``--check-only``, every check held and the work was not run (CHECKED:
  the script calls :func:`checks_done` where its checks end);
- 77 :class:`SkipScript` (SKIP in the ``verify`` report);
- 2 a usage error: argparse's, or a :class:`~common.errors.UsageError` raised later (a corpus file
  that is not text, ``--resume`` without a checkpoint), printed as one line;
- 130 Ctrl-C, 143 SIGTERM (``kill``, a batch scheduler, ``verify``'s time limit): SIGTERM takes the
  same path as Ctrl-C, so a training run saves its checkpoint, the JSON says INTERRUPTED, and one
  line gives the exact command that resumes;
- 1 any other failure, with its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import SKIP_EXIT_CODE, USAGE_EXIT_CODE, ChecksPassed, Interrupted, SkipScript, UsageError
from common.folder_lock import FolderInUse, lock_folder, release_all
from common.launch import is_main

QUICK_ENV = "BOOK_QUICK"
DTYPE_ENV = "BOOK_DTYPE"
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

# the parser and arguments of the script that run_script is running (for --json and the resume line)
_current: dict[str, Any] = {}


def quick_from_env() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _int_type(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    span = f"from {low} to {high}" if high is not None else f"at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what or 'the value'} must be {span}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return _with_range(parse, span, low, high)


def _with_range(parse, span: str, low, high, low_open: bool = False, high_open: bool = False, excludes=()):
    """Record on an argparse type what it takes: the help text shows ``span`` (:func:`document_ranges`),
    and tests/test_flag_walk.py tries the values on both sides of each end."""
    parse.span, parse.low, parse.high, parse.low_open, parse.high_open = span, low, high, low_open, high_open
    parse.excludes = excludes
    return parse


def float_between(
    low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """argparse type factory: a finite number between ``low`` and ``high`` (None: unbounded), each end
    included unless ``low_open``/``high_open``; nan and inf are refused."""
    if low is not None and high is not None:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        span = f"{'above' if low_open else 'at least'} {low:g}"
    else:
        span = f"{'below' if high_open else 'at most'} {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        inside = math.isfinite(value)
        if inside and low is not None:
            inside = value > low if low_open else value >= low
        if inside and high is not None:
            inside = value < high if high_open else value <= high
        if not inside:
            raise argparse.ArgumentTypeError(f"the value must be a finite number {span}, got {text}")
        return value

    parse.__name__ = "float"
    return _with_range(parse, span, low, high, low_open, high_open)


def group_size_int(text: str) -> int:
    """argparse type: a quantisation group width, a positive integer or -1 (one group per row)."""
    value = _int_type(-1, what="the group size")(text)
    if value == 0:
        raise argparse.ArgumentTypeError("the group size must be -1 (one group per row) or at least 1, got 0")
    return value


group_size_int.__name__ = "int"
_with_range(group_size_int, "-1: one group per row, or at least 1", -1, None, excludes=(0,))


def int_between(low: int, high: int):
    """argparse type factory: an integer from ``low`` to ``high`` (a grid, an opset, a size)."""
    return _int_type(low, high, what="the value")


def int_list(low: int, high: int | None = None):
    """argparse type factory: comma-separated integers, each from ``low`` to ``high`` (``1,2,4``)."""
    one = _int_type(low, high, what="each value")

    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"give comma-separated integers such as 1,2,4, got {text!r}")
        return [one(p) for p in parts]

    parse.__name__ = "int list"
    return _with_range(parse, f"comma-separated, each {one.span}", low, high)


def quick_or_full(args: argparse.Namespace, **defaults: tuple) -> None:
    """Give each flag the user left unset (``None``) its default, ``(quick, full)`` by ``--quick``:
    ``quick_or_full(args, group_size=(32, 128))``.  A value the user gave is kept, in quick mode too."""
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


positive_int = _int_type(1, what="the value")
non_negative_int = _int_type(0, what="the value")
seed_int = _int_type(0, SEED_MAX, what="a seed")
positive_float = float_between(0, None, low_open=True)  # a learning rate, a temperature
non_negative_float = float_between(0, None)  # a loss coefficient, a clipping norm (0: off)
unit_float = float_between(0, 1)  # a weight between two terms, a share
fraction = float_between(0, 1, high_open=True)  # a share removed: 1 would leave nothing
# sizes of what the scripts allocate, bounded so that a typo is a usage error rather than hours of swapping
width_int = int_between(1, 65536)  # d_model, d_ff, a matrix side, a vocabulary
count_int = int_between(1, 1 << 20)  # tokens, sequences, layers (about a million)
process_count = int_between(1, 256)  # worker processes on one machine


def document_ranges(parser: argparse.ArgumentParser) -> None:
    """Append to each flag's help what its type takes (``[at least 1]``), once per parser."""
    if getattr(parser, "ranges_documented", False):
        return
    parser.ranges_documented = True
    for action in parser._actions:
        span = getattr(action.type, "span", None)
        if span and action.help and action.help is not argparse.SUPPRESS:
            action.help = f"{action.help} [{span}]"


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
    g.add_argument("--seed", type=seed_int, default=0, help="seed for python, numpy and torch")
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
    g.add_argument(
        "--check-only",
        action="store_true",
        help="check the flags, the paths and what they name (model, data, checkpoint), then stop before "
        "the work: exit 0 when every check holds, 2 with the first that fails",
    )
    return parser


def checks_done(args: argparse.Namespace) -> None:
    """Where a script's checks end and its work begins: under ``--check-only`` the runner stops here
    (exit 0, status CHECKED).  Every section script calls it once, after its last check."""
    if args.check_only:
        raise ChecksPassed()


def add_dtype_flag(parser: argparse.ArgumentParser, fp16: bool = False) -> None:
    """``--dtype auto|fp32|bf16`` (and fp16 where the script handles a loss scaler) for a script that
    trains or decodes.  :func:`parse_args` turns it into the dtype's name (``args.dtype``) with the reason
    (``args.dtype_reason``); train under ``common.training.autocast_for``, decode with the model cast."""
    choices = ["auto", "fp32", "bf16"] + (["fp16"] if fp16 else [])
    parser.dtype_choices = choices
    parser.add_argument(
        "--dtype",
        choices=choices,
        default=None,
        help=f"compute dtype (default: ${DTYPE_ENV}, else auto = bf16 on a GPU that supports it, fp32 on a "
        "CPU; bf16 on a CPU runs natively with AVX512_BF16 or AMX, emulated and slow without)",
    )


def _resolve_dtype_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from common import env

    choices = parser.dtype_choices
    asked = args.dtype or os.environ.get(DTYPE_ENV, "").strip().lower() or "auto"
    if asked not in choices:
        parser.error(f"{DTYPE_ENV}={asked!r}: choose from {', '.join(choices)}")
    if asked == "auto":
        chosen, reason = env.choose_dtype(args.device)
        name = env.dtype_name(chosen)
        if name not in choices:
            name, reason = "fp32", f"{reason}; this script takes no {name}: fp32"
    else:
        name, reason = asked, "asked for" if args.dtype else f"from {DTYPE_ENV}"
    if name == "bf16" and args.device == "cpu" and not env.cpu_bf16_native():
        reason += " (this CPU has no AVX512_BF16/AMX: bf16 is emulated and slower than fp32)"
    args.dtype, args.dtype_reason = name, reason
    print(f"compute dtype: {name} ({reason})")


class ScriptParser(argparse.ArgumentParser):
    """argparse's parser, remembering its usage error so that ``--json`` can record it."""

    def error(self, message: str):
        _current["usage_error"] = message
        super().error(message)


def script_parser(doc: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An argparse parser with the shared flags; ``doc`` (the module docstring) is its help text."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    parser = ScriptParser(description=doc, **kwargs)
    return add_common_args(parser)


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), or None when they can."""
    if folder.exists():
        if not folder.is_dir():
            return f"{folder} is not a folder"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
        return None
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {folder}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {folder}: {parent} is not writable"
    return None


def check_output_targets(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for ``--json`` and ``--out`` targets that could not be written at the end."""
    if args.json:
        target = Path(args.json)
        if target.is_dir():
            parser.error(
                f"argument --json: {target} is a folder; give a file path such as {target / 'figures.json'}"
            )
        problem = _folder_problem(target.absolute().parent)
        if problem is None and target.exists() and not os.access(target, os.W_OK):
            problem = f"{target} is not writable"
        if problem:
            parser.error(f"argument --json: {problem}")
    problem = _folder_problem(Path(args.out).absolute())
    if problem:
        parser.error(f"argument --out: {problem}")


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``, check the output targets, turn on quick mode from the environment, seed
    everything and pick the device.

    ``args.device`` becomes the chosen device name ("cpu", "cuda", "mps"); ``args.device_reason``
    says why.  Asking for cuda or mps where there is none raises :class:`SkipScript`.  ``args.out``
    defaults to ``runs/<name of the calling script>``; it is created here and locked for this run
    (:mod:`common.folder_lock`: a second run on it is a usage error naming the first), except under
    ``--check-only``, which writes nothing.  Nothing else
    about the process changes: allocator settings such as :func:`common.env.keep_freed_memory` are for
    the caller to opt into.
    """
    from common import env

    document_ranges(parser)
    args = parser.parse_args(argv)
    _current.update(parser=parser, args=args)
    if args.out is None:
        caller = sys._getframe(1).f_globals.get("__file__") or "script"
        args.out = os.path.join("runs", os.path.splitext(os.path.basename(caller))[0])
    check_output_targets(parser, args)
    if is_main() and not args.check_only:  # under a launcher, rank 0 holds it for the job
        try:
            lock_folder(args.out)
        except FolderInUse as e:
            parser.error(f"argument --out: {e}")
    args.quick = bool(args.quick or quick_from_env())
    env.seed_everything(args.seed)
    args.device, args.device_reason = env.choose_device(args.device)
    if hasattr(parser, "dtype_choices"):
        _resolve_dtype_flag(parser, args)
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
    """Write atomically, so a reader never sees half a file (and no temporary file stays behind)."""
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "w") as f:
            json.dump(_jsonable(payload), f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_in_argv(argv: list[str]) -> str | None:
    """The ``--json`` target of a command line the parser rejected (so the failure is still recorded)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--json="):
            return arg.split("=", 1)[1]
        if arg == "--json" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same one, with ``--resume`` where the script has it."""
    parser = _current.get("parser")
    if parser is not None and "--resume" in parser._option_string_actions and "--resume" not in argv:
        argv = [*argv, "--resume"]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(head + list(argv))


def stop_signals() -> list[int]:
    """The signals that stop a run cleanly besides Ctrl-C's SIGINT: SIGTERM (``kill``, a scheduler, the
    harness's time limit on POSIX) and, on Windows, SIGBREAK (Ctrl-Break, and the harness's
    ``CTRL_BREAK_EVENT``)."""
    return [signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])


def handle_stop_signals(handler) -> dict:
    """Install ``handler`` for :func:`stop_signals`; returns the previous handlers for
    :func:`restore_signals`."""
    return {signum: signal.signal(signum, handler) for signum in stop_signals()}


def restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def raise_interrupted(signum, frame):
    """The stop signals' handler: the path Ctrl-C takes (:class:`Interrupted`, a ``KeyboardInterrupt``)."""
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Interrupted(signum)


def run_script(main: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> None:
    """Run a section script's ``main`` and exit with the codes of the module docstring."""
    argv = sys.argv[1:] if argv is None else argv
    _current.clear()

    captured: list[str] = []
    original_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        captured.append(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")
        original_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    in_main_thread = threading.current_thread() is threading.main_thread()
    original_handlers = handle_stop_signals(raise_interrupted) if in_main_thread else {}
    status, reason, figures, code, extra = "PASS", "", {}, 0, {}
    start = time.perf_counter()
    try:
        figures = main(argv) or {}
        if not isinstance(figures, dict):
            raise TypeError(f"main() must return a dict of figures, got {type(figures).__name__}")
        if getattr(_current.get("args"), "check_only", False):  # the work ran: the script lacks checks_done
            raise RuntimeError("--check-only: this script never called common.runner.checks_done")
    except ChecksPassed:
        status, reason = "CHECKED", "--check-only: every check held; the work was not run"
        print("\nchecks passed: every check held; the work was not run")
    except SkipScript as e:
        status, reason, code = "SKIP", str(e), SKIP_EXIT_CODE
        print(f"\nSKIP: {e}", file=sys.stderr)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = signal.Signals(signum).name
        status, code = "INTERRUPTED", 128 + signum
        reason = f"interrupted by {how}"
        if getattr(e, "checkpoint_dir", None):
            extra = {"checkpoint": str(e.checkpoint_dir), "step": e.step, "resume": resume_command(argv)}
            reason += f" at step {e.step}; checkpoint in {e.checkpoint_dir}"
            print(f"\n{reason}; resume with: {extra['resume']}", file=sys.stderr)
        else:
            print(f"\n{reason}", file=sys.stderr)
    except UsageError as e:
        parser = _current.get("parser")
        prog = parser.prog if parser is not None else os.path.basename(sys.argv[0])
        status, reason, code = "FAIL", f"usage error: {e}", USAGE_EXIT_CODE
        print(f"{prog}: error: {e}", file=sys.stderr)
    except SystemExit as e:  # argparse --help / bad flags
        if e.code in (0, None):
            raise
        code = int(e.code) if isinstance(e.code, int) else USAGE_EXIT_CODE
        status = "FAIL"
        reason = f"usage error: {_current['usage_error']}" if "usage_error" in _current else f"exit {e.code}"
    except BaseException as e:  # noqa: BLE001 - the report needs every failure
        traceback.print_exc()
        status, reason, code = "FAIL", f"{type(e).__name__}: {e}", 1
    finally:
        warnings.showwarning = original_showwarning
        release_all()
        restore_signals(original_handlers)
    seconds = time.perf_counter() - start
    args = _current.get("args")
    if status == "PASS" and getattr(args, "dtype_reason", None):
        figures.setdefault("dtype", args.dtype)  # which dtype the figures were measured in
    if status == "PASS":
        print_figures(figures)
    json_path = args.json if args is not None else _json_in_argv(argv)
    # a folder as --json, or one under a file, is the usage error just shown: nothing to write
    if (
        json_path
        and not os.path.isdir(json_path)
        and _folder_problem(Path(json_path).absolute().parent) is None
    ):
        payload = {
            "status": status,
            "reason": reason,
            "seconds": seconds,
            "figures": figures,
            "warnings": captured,
            **extra,
        }
        try:
            write_json(json_path, payload)
        except OSError as e:
            print(f"could not write --json {json_path}: {e}", file=sys.stderr)
            code = code or 1
    sys.stdout.flush()
    sys.exit(code)
