"""Run every section script of the book, each in its own process, and write the report.

    python -m verify --quick                 # the whole book in quick mode, report in verify/out/
    python -m verify --only s4_2 --device cuda --out verify/reports/cuda-full
    python -m verify --list
    python -m verify --quick --compare verify/reports/cpu-quick/report.json

Each script ``ch*/s*.py`` runs as ``python -m package.module --json FIGURES [--quick] --device D`` in a
fresh process group with a time limit (``--timeout 0``: none).  At the limit the script gets SIGTERM
(CTRL_BREAK_EVENT on Windows: :mod:`verify.process_group`), which the runner turns into its Ctrl-C
path (a training script saves its checkpoint), then, after a grace period, SIGKILL together with its
children; the report says TIMEOUT.  SIGTERM to the harness itself takes the path of Ctrl-C: the
running script is ended with its grace period and recorded, the report written, exit 128 + the
signal's number.  The PNG plots a script
wrote into its output folder (``runs/<script>/``) during the run are copied to
``<report>/plots/<script>/`` and listed in its entry (``python -m verify.samples`` shows them in the
chapter READMEs).  ``report.json`` and ``report.md`` are rewritten atomically after every script, so
a crash, a hang or an interrupt of the harness never loses the lines already written.  The exit
status is 0 only when no script FAILED or TIMED OUT.

A run limited by ``--only`` writes to ``verify/out/partial/`` unless ``--out`` is given, so it never
replaces the report of a whole run; ``--update`` merges it into the report in ``--out`` instead.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.runner import (
    DTYPE_ENV,
    QUICK_ENV,
    SKIP_EXIT_CODE,
    handle_stop_signals,
    raise_interrupted,
    restore_signals,
    write_json,
)
from verify.process_group import ScriptProcess
from verify.report import compare_reports, format_markdown, summarize

REPO_ROOT = Path(__file__).resolve().parent.parent
STATUSES = ("PASS", "FAIL", "SKIP", "TIMEOUT")
GRACE_SECONDS = 15.0  # between SIGTERM and SIGKILL at the time limit: time to save a checkpoint
DEFAULT_OUT = REPO_ROOT / "verify" / "out"


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def discover(root: Path, patterns: list[str] | None = None) -> list[str]:
    """Every ``ch*/s*.py`` under ``root`` (relative paths, in section order), filtered by ``patterns``.

    A pattern matches when it is a substring of the path or an fnmatch glob of it.
    """
    found = sorted((str(p.relative_to(root)) for p in root.glob("ch*/s*.py")), key=_natural_key)
    return [p for p in found if matches(p, patterns)]


def matches(path: str, patterns: list[str] | None) -> bool:
    """Whether ``path`` is selected by ``--only`` ``patterns`` (every path is, without patterns)."""
    return not patterns or any(pat in path or fnmatch.fnmatch(path, pat) for pat in patterns)


def _tail_reason(log_path: Path) -> str:
    """The last meaningful line of a log: usually the exception of a traceback."""
    try:
        text = log_path.read_bytes()[-20000:].decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line) or line.startswith("SKIP:"):
            return line[:300]
    return lines[-1][:300] if lines else ""


_WARNING_RE = re.compile(r"^.*?:\d+: (\w*Warning): (.*)$")


def _warnings_from_log(log_path: Path) -> list[str]:
    try:
        text = log_path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [f"{m.group(1)}: {m.group(2)}" for m in map(_WARNING_RE.match, text.splitlines()) if m]


def copy_plots(script_out: Path, since: float, dest: Path, out_dir: Path) -> list[str]:
    """Copy the PNGs written under ``script_out`` at or after ``since`` (epoch seconds) into ``dest``;
    return their paths relative to ``out_dir`` (the report folder)."""
    shutil.rmtree(dest, ignore_errors=True)
    copied = []
    for png in sorted(script_out.rglob("*.png")) if script_out.is_dir() else []:
        if png.stat().st_mtime >= since:
            target = dest / png.relative_to(script_out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, target)
            copied.append(str(target.relative_to(out_dir)))
    return copied


def run_one(
    rel_path: str,
    *,
    root: Path,
    out_dir: Path,
    quick: bool,
    device: str,
    timeout: float,
    python: str = sys.executable,
    grace: float = GRACE_SECONDS,
) -> dict:
    """Run one section script (``timeout`` 0: no limit); return its report entry."""
    module = rel_path[:-3].replace("/", ".").replace(os.sep, ".")
    stem = module.replace(".", "__")
    log_path = out_dir / "logs" / f"{stem}.log"
    fig_path = out_dir / "figures" / f"{stem}.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fig_path.parent.mkdir(parents=True, exist_ok=True)
    if fig_path.exists():
        fig_path.unlink()
    started_at = time.time() - 1  # file times are coarse on some filesystems

    cmd = [python, "-m", module, "--json", str(fig_path), "--device", device] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root), str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    if quick:
        env[QUICK_ENV] = "1"

    entry = {
        "name": rel_path,
        "status": "FAIL",
        "reason": "",
        "exit_code": -1,
        "seconds": 0.0,
        "peak_rss_mb": 0.0,
        "warnings": [],
        "figures": {},
        "log": str(log_path.relative_to(out_dir)),  # relative to the report folder
        "plots": [],
    }
    start = time.monotonic()
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = ScriptProcess(
            cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        timed_out, interrupted = False, None
        try:
            while not proc.poll():
                if timeout and time.monotonic() - start > timeout:
                    timed_out = True
                    proc.stop(grace)
                    break
                time.sleep(0.05)
        except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (main's handler): the script's clean stop
            interrupted = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
            proc.stop(grace)
        except BaseException:
            proc.stop()
            raise
        proc.wait()
    entry["seconds"] = round(time.monotonic() - start, 2)
    entry["exit_code"] = proc.returncode
    entry["peak_rss_mb"] = proc.peak_rss_mb

    payload, payload_error = {}, ""
    if fig_path.exists():
        try:
            payload = json.loads(fig_path.read_text())
        except (OSError, ValueError) as e:
            payload_error = f"unreadable figures file: {e}"
    entry["figures"] = payload.get("figures", {}) if isinstance(payload, dict) else {}
    entry["warnings"] = payload.get("warnings") or _warnings_from_log(log_path)
    script_out = root / "runs" / Path(rel_path).stem  # the runner's default --out
    entry["plots"] = copy_plots(script_out, started_at, out_dir / "plots" / stem, out_dir)

    code = proc.returncode
    if interrupted:
        entry["status"] = "FAIL"
        entry["reason"] = f"interrupted: the harness was stopped by {interrupted}"
        entry["interrupted"] = interrupted
        if isinstance(payload, dict) and payload.get("resume"):
            entry["reason"] += f"; checkpoint saved, resume with: {payload['resume']}"
    elif timed_out:
        entry["status"], entry["reason"] = "TIMEOUT", f"stopped after {timeout:g} s"
        if isinstance(payload, dict) and payload.get("resume"):
            entry["reason"] += f"; checkpoint saved, resume with: {payload['resume']}"
    elif code == 0:
        entry["status"] = "PASS"
        entry["reason"] = payload_error
    elif code == SKIP_EXIT_CODE:
        entry["status"] = "SKIP"
        entry["reason"] = payload.get("reason") or _tail_reason(log_path).removeprefix("SKIP: ")
    else:
        entry["status"] = "FAIL"
        if code < 0:
            entry["reason"] = f"killed by signal {signal.Signals(-code).name}"
        else:
            entry["reason"] = payload.get("reason") or _tail_reason(log_path) or f"exit code {code}"
    return entry


def write_report(report: dict, out_dir: Path) -> None:
    report["summary"] = summarize(report["scripts"])
    write_json(str(out_dir / "report.json"), report)
    tmp = out_dir / f"report.md.tmp{os.getpid()}"
    tmp.write_text(format_markdown(report))
    os.replace(tmp, out_dir / "report.md")


def _progress_line(i: int, n: int, e: dict) -> str:
    figs = ", ".join(f"{k}={_short(v)}" for k, v in list(e["figures"].items())[:2])
    why = f"  ({e['reason'][:90]})" if e["reason"] and e["status"] != "PASS" else ""
    return (
        f"[{i:>{len(str(n))}}/{n}] {e['status']:<7} {e['name']:<55} {e['seconds']:>7.1f} s "
        f"{e['peak_rss_mb']:>7.0f} MB  {figs}{why}"
    )


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def collect_environment() -> dict:
    """The environment report, built in a child process.

    Building it imports torch, transformers, deepspeed and the rest; done here it would leave the
    harness at several hundred MB, and every script forked from it would report at least that much
    as its peak RSS (Linux keeps a child's high-water mark across exec).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "common.env", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"python -m common.env --json failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def machine_of(environment: dict) -> dict:
    """What a report's timings depend on: the CPU, its flags and cores, torch's kernels, the GPUs."""
    torch = environment.get("torch") or {}
    return {
        "cpu": environment.get("cpu"),
        "cpu_flags": environment.get("cpu_flags"),
        "cores": environment.get("cores"),
        "cpu_capability": torch.get("cpu_capability"),
        "gpus": torch.get("gpus"),
    }


def _describe_machine(m: dict) -> str:
    gpus = ", ".join(map(str, m.get("gpus") or [])) or "no GPU"
    flags = " ".join(m.get("cpu_flags") or [])
    return f"{m.get('cpu')} ({flags}; torch {m.get('cpu_capability')}), {m.get('cores')} cores, {gpus}"


def _kept_entries(old_report: Path, running: list[str], quick: bool, environment: dict) -> list[dict]:
    """The entries of an earlier report for the scripts not run now (``--update``).  SystemExit with
    one line when that report is unreadable, of the other mode, or measured on another machine (the
    kept timings and the new ones would not compare)."""
    if not old_report.exists():
        return []
    try:
        old = json.loads(old_report.read_text())
        scripts = old["scripts"]
        if not isinstance(scripts, list) or not all(isinstance(e, dict) and "name" in e for e in scripts):
            raise ValueError("no list of script entries")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"--update: {old_report} is not a readable verify report ({e}); remove it or choose another --out"
        ) from None
    old_env = old.get("environment") if isinstance(old.get("environment"), dict) else {}
    old_quick = (old_env.get("run") or {}).get("quick")
    if old_quick is not None and old_quick != quick:
        mode = "quick" if old_quick else "full"
        raise SystemExit(f"--update: {old_report} is a {mode}-mode report; run in the same mode")
    if old_env and machine_of(old_env) != machine_of(environment):
        then, now = (_describe_machine(machine_of(e)) for e in (old_env, environment))
        raise SystemExit(
            f"--update: {old_report} was measured on {then}; this machine is {now}; an update would mix the "
            "two in one report: run the whole report here, or choose another --out"
        )
    return [e for e in scripts if e["name"] not in running]


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0 (0: no limit), got {text}")
    return value


def load_compare(parser: argparse.ArgumentParser, path: str) -> dict:
    """The earlier report given as ``--compare``, checked before anything runs (a usage error if unusable)."""
    try:
        old = json.loads(Path(path).read_text())
    except OSError as e:
        parser.error(f"argument --compare: cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        parser.error(f"argument --compare: {path} is not JSON: {e}")
    scripts = old.get("scripts") if isinstance(old, dict) else None
    if not isinstance(scripts, list) or not all(isinstance(e, dict) and "name" in e for e in scripts):
        parser.error(f"argument --compare: {path} is not a verify report (no list of scripts)")
    for e in scripts:
        if e.get("status") not in STATUSES:
            parser.error(f"argument --compare: {path}: {e['name']} has no status of {', '.join(STATUSES)}")
        if not isinstance(e.get("figures", {}), dict):
            parser.error(f"argument --compare: {path}: the figures of {e['name']} are not a mapping")
    return old


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="run every script in quick mode")
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="run only scripts whose path contains PATTERN or matches it as a glob (repeatable)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="passed to every script as --device",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "fp32", "bf16"],
        help=f"the compute dtype of every script that takes --dtype (sets {DTYPE_ENV} for them; default: "
        f"${DTYPE_ENV}, else each script's auto: fp32 on a CPU, bf16 on a GPU that has it)",
    )
    parser.add_argument(
        "--timeout",
        type=_non_negative_seconds,
        default=None,
        help="per-script time limit in seconds; 0: no limit (default 300 quick, 1800 full)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help=f"output folder for the report (default {DEFAULT_OUT.relative_to(REPO_ROOT)}/, "
        f"or {(DEFAULT_OUT / 'partial').relative_to(REPO_ROOT)}/ for a run limited by --only)",
    )
    parser.add_argument(
        "--compare", metavar="OLD_REPORT_JSON", help="print what changed against an earlier report"
    )
    parser.add_argument("--list", action="store_true", help="list the scripts that would run, then exit")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the entries of the report already in --out for the scripts not run now "
        "(refresh part of a report, e.g. with --only); the earlier run must be in the same mode",
    )
    parser.add_argument(
        "--root", default=str(REPO_ROOT), help=argparse.SUPPRESS
    )  # tests use a throwaway tree
    args = parser.parse_args(argv)
    if args.dtype is not None:  # the scripts read it from their environment (common.runner)
        os.environ[DTYPE_ENV] = args.dtype
    elif os.environ.get(DTYPE_ENV, "auto") not in ("auto", "fp32", "bf16"):
        parser.error(f"{DTYPE_ENV}={os.environ[DTYPE_ENV]!r}: choose from auto, fp32, bf16")

    root = Path(args.root).resolve()
    scripts = discover(root, args.only)
    if args.list:
        print("\n".join(scripts) if scripts else "no scripts found")
        return 0
    if not scripts:
        what = f"--only {' '.join(map(repr, args.only))}" if args.only else "ch*/s*.py"
        parser.error(f"no section script under {root} matches {what}")
    old = load_compare(parser, args.compare) if args.compare else None
    timeout = args.timeout if args.timeout is not None else (300.0 if args.quick else 1800.0)
    partial = bool(args.only) and not args.update
    out_dir = Path(args.out or (DEFAULT_OUT / "partial" if partial else DEFAULT_OUT)).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"argument --out: {out_dir} is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        parser.error(f"argument --out: cannot write into {out_dir}: {e.strerror or e}")
    if partial and args.out:
        _say_what_is_replaced(out_dir / "report.json", scripts)

    from common.env import format_report

    print("collecting the environment report ...", flush=True)
    environment = collect_environment()
    print(format_report(environment), flush=True)
    report = {"environment": environment, "scripts": [], "summary": {}}
    kept = _kept_entries(out_dir / "report.json", scripts, args.quick, environment) if args.update else []
    environment["run"] = {
        "quick": args.quick,
        "device": args.device,
        "dtype": os.environ.get(DTYPE_ENV, "auto"),
        "timeout": timeout,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    if args.only:
        environment["run"]["only"] = args.only
    if kept:
        environment["run"]["kept_from_earlier_run"] = [e["name"] for e in kept]
    order = {name: i for i, name in enumerate(discover(root))}
    report["scripts"] = list(kept)
    write_report(report, out_dir)
    mode = "quick" if args.quick else "full"
    limit = f"limit {timeout:g} s each" if timeout else "no time limit"
    print(f"\nrunning {len(scripts)} scripts ({mode} mode, device {args.device}, {limit})", flush=True)

    interrupted = None
    previous = handle_stop_signals(raise_interrupted)
    try:
        for i, rel in enumerate(scripts, 1):
            try:
                entry = run_one(
                    rel, root=root, out_dir=out_dir, quick=args.quick, device=args.device, timeout=timeout
                )
            except KeyboardInterrupt as e:  # between two scripts
                entry = None
                interrupted = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
            if entry is not None:
                interrupted = entry.pop("interrupted", None)
                report["scripts"].append(entry)
                report["scripts"].sort(key=lambda e: order.get(e["name"], len(order)))
                write_report(report, out_dir)
                print(_progress_line(i, len(scripts), entry), flush=True)
            if interrupted:
                print(
                    f"interrupted by {interrupted}: the report holds every script run so far", file=sys.stderr
                )
                break
    finally:
        restore_signals(previous)

    s = report["summary"]
    print("\n" + "  ".join(f"{k} {s.get(k, 0)}" for k in STATUSES) + f"   report: {out_dir / 'report.md'}")
    if old is not None:
        selected = (lambda name: matches(name, args.only)) if args.only else None
        print("\n" + compare_reports(old, report, selected=selected))
    if interrupted:
        return 128 + signal.Signals[interrupted].value
    return 1 if s.get("FAIL", 0) or s.get("TIMEOUT", 0) else 0


def _say_what_is_replaced(old_report: Path, running: list[str]) -> None:
    """A partial run replaces the report in its ``--out``: say so when that report covered more."""
    try:
        old = json.loads(old_report.read_text())
        others = [e["name"] for e in old["scripts"] if e["name"] not in running]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if others:
        print(
            f"note: {old_report} held {len(others)} other script(s) ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); this --only run replaces it (--update keeps them)",
            file=sys.stderr,
            flush=True,
        )
