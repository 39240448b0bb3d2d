"""Rewrite the sample output in the chapter READMEs from the logs of a committed report.

    python -m verify.samples                    # from verify/reports/cpu-full-amx/logs/
    python -m verify.samples --report cpu-quick
    python -m verify.samples --check            # exit 1 if a README is not what the logs give

A sample is a fenced block in a chapter's README.md whose first line is
``$ python -m <chapter>.<script>``. Its body becomes that script's log, cleaned: the harness's own
command line and the figures table the runner prints last are left out, and so are progress bars
and libraries' notes about themselves (:data:`NOISE`: DeepSpeed's "Setting accelerator to CPU", the
torch profiler's trace markers...). An HTML comment on the line before the fence
shortens a long block: ``<!-- sample: omit=REGEX -->`` turns each run of lines matching REGEX into
one ``...``.

After each sample block come the script's plots from the same report (the PNGs the harness copied
to ``<report>/plots/<script>/``), inline, between the markers ``<!-- plots -->`` and
``<!-- /plots -->``, so a reader sees the curves without running anything.  The generator rewrites
that region (adds it where a report has plots, removes it where it has none).
Nothing outside the sample blocks and their plot regions changes.

A script prints where it saved each plot; a log that names a PNG its report entry lacks (an entry run
before the script drew it) makes both ``python -m verify.samples`` and ``--check`` exit 1, naming it:
the README would mention a picture it cannot show.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from common.runner import FIGURES_HEADING
from verify.harness import REPO_ROOT

SAMPLES_REPORT = "cpu-full-amx"  # the complete full-mode report whose logs and plots the READMEs show
BLOCK = re.compile(
    r"(?:^<!-- sample: omit=(?P<omit>.+?) -->\n)?^```\n\$ python -m (?P<module>[\w.]+)(?P<args>[^\n]*)\n"
    r"(?P<body>.*?)^```$"
    r"(?P<plots>\n\n<!-- plots -->\n.*?^<!-- /plots -->$)?",
    re.MULTILINE | re.DOTALL,
)
# tqdm's frames, and the plain lines common.progress prints instead where output is not a terminal
PROGRESS = re.compile(r"\d+%\||\d it/s|\ds/it|\?it/s|^[^:]+: \d+/\d+ \(\d+%\) \d+ s\b")
# libraries' notes about themselves, not the section's output: DeepSpeed's accelerator choice and its
# op build, the torch profiler's trace markers, torch's ONNX exporter on an absent torchvision,
# onnxruntime's advice to pre-process before quantising, torch's note on the enums torchao registers
# (GPTQModel imports it)
NOISE = re.compile(
    r"\[WARNING\] \[real_accelerator\.py|^DeepSpeed deepspeed\.ops\.\S+ built successfully"
    r"|^USDT:.*profiler_(start|stop)$|torchvision is not installed\. Skipping torchvision::"
    r"|^WARNING:root:Please consider to run pre-processing before quantization"
    r"|_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass"
)


def clean(log: str, omit: str | None = None) -> str:
    """The lines a reader would have seen, from a harness log (see the module docstring)."""
    lines = log.splitlines()[1:]  # the first line is the harness's command
    if FIGURES_HEADING in lines:  # the runner's figures table closes the log
        lines = lines[: len(lines) - 1 - lines[::-1].index(FIGURES_HEADING)]
    out = []
    for line in lines:
        if not line.strip():
            out.append("")  # a blank line the script printed
            continue
        # a progress bar redraws itself after carriage returns: keep what is not one
        out += [
            s.rstrip()
            for s in line.split("\r")
            if s.strip() and not PROGRESS.search(s) and not NOISE.search(s)
        ]
    if omit:
        pattern, shortened = re.compile(omit), []
        for line in out:
            if pattern.search(line):
                indent = line[: len(line) - len(line.lstrip())]
                if not shortened or shortened[-1].strip() != "...":  # one mark per run
                    shortened.append(indent + "...")
            else:
                shortened.append(line)
        out = shortened
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")
    return re.sub(r"\n\n(?=\s*step )", "\n", text)  # a progress bar's empty line before a step report


def plots_region(stem: str, logs: Path, readme_dir: Path) -> str:
    """The Markdown images of ``<report>/plots/<stem>/`` (the report holding ``logs``), linked relative
    to ``readme_dir``, between the plot markers; empty when the report has no plots for ``stem``."""
    folder = logs.parent / "plots" / stem
    pngs = sorted(folder.rglob("*.png")) if folder.is_dir() else []
    if not pngs:
        return ""
    images = [f"![{p.stem}]({Path(os.path.relpath(p, readme_dir)).as_posix()})" for p in pngs]
    return "\n\n<!-- plots -->\n" + "\n".join(images) + "\n<!-- /plots -->"


PNG = re.compile(r"[\w./-]+\.png\b")


def missing_plots(stem: str, logs: Path) -> list[str]:
    """The PNG files the log of ``stem`` names (a script prints where it saved each plot) that its
    report did not keep under ``plots/<stem>/``: a sample would mention a picture it cannot show."""
    log = logs / f"{stem}.log"
    folder = logs.parent / "plots" / stem
    kept = {p.name for p in folder.rglob("*.png")} if folder.is_dir() else set()
    text = log.read_text(errors="replace") if log.exists() else ""
    return [name for name in dict.fromkeys(Path(m).name for m in PNG.findall(text)) if name not in kept]


def rewrite(readme: str, logs: Path, readme_dir: Path | None = None) -> str:
    """``readme`` with every sample block's body rebuilt from ``logs/<module>.log`` and, given the
    README's folder ``readme_dir``, the report's plots shown after it."""

    def body(m: re.Match) -> str:
        stem = m["module"].replace(".", "__")
        log = logs / f"{stem}.log"
        if not log.exists():
            raise FileNotFoundError(f"no log for the sample 'python -m {m['module']}': {log}")
        head = f"<!-- sample: omit={m['omit']} -->\n" if m["omit"] else ""
        text = clean(log.read_text(errors="replace"), m["omit"])
        plots = plots_region(stem, logs, readme_dir) if readme_dir is not None else (m["plots"] or "")
        return f"{head}```\n$ python -m {m['module']}{m['args']}\n{text}\n```{plots}"

    return BLOCK.sub(body, readme)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--report",
        default=SAMPLES_REPORT,
        help=f"the folder under verify/reports/ whose logs to show (default {SAMPLES_REPORT})",
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a README is stale")
    args = parser.parse_args(argv)
    logs = REPO_ROOT / "verify" / "reports" / args.report / "logs"
    if not logs.is_dir():
        raise SystemExit(f"no logs at {logs}: run `python -m verify` first (or pick --report)")
    stale, unshown = [], []
    for readme in sorted(REPO_ROOT.glob("ch*/README.md")):
        old = readme.read_text()
        new = rewrite(old, logs, readme.parent)
        for m in BLOCK.finditer(old):
            stem = m["module"].replace(".", "__")
            unshown += [f"{m['module']}: {name}" for name in missing_plots(stem, logs)]
        if new != old:
            stale.append(readme.relative_to(REPO_ROOT))
            if not args.check:
                readme.write_text(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "every sample matches the logs")
    if unshown:
        print(
            f"plots a log names that {args.report} lacks (rerun those scripts into it): " + "; ".join(unshown)
        )
    return 1 if unshown or (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
