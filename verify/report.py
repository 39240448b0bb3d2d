"""The report's human side: the Markdown page, the summary counts, and the comparison of two runs."""

from __future__ import annotations

import math

from common.env import held_text

STATUSES = ("PASS", "FAIL", "SKIP", "TIMEOUT")
MOVED = 0.05  # a numeric figure "moved" when it changed by more than 5 % (relative)


def summarize(scripts: list[dict]) -> dict:
    counts = {s: 0 for s in STATUSES}
    for e in scripts:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    return counts


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_markdown(report: dict) -> str:
    env = report["environment"]
    t = env.get("torch", {})
    run = env.get("run", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in t.get("gpus", [])) or "none"
    lines = [
        "# Book verification report",
        "",
        f"Run {run.get('started', '?')}: {'quick' if run.get('quick') else 'full'} mode, "
        f"device `{run.get('device', '?')}`"
        + (f", dtype `{run['dtype']}`" if run.get("dtype", "auto") != "auto" else "")
        + f", limit {run.get('timeout', '?')} s per script.",
        "",
        "## Environment",
        "",
        f"- OS: {env.get('os')}; CPU: {env.get('cpu')} ({env.get('cores')} cores; "
        f"{', '.join(env.get('cpu_flags', [])) or 'SIMD unknown'}); memory {env.get('memory_gib')} GiB",
        f"- Python {env.get('python')}; torch {t.get('version')} "
        f"(CPU kernels {t.get('cpu_capability')}, oneDNN {t.get('onednn_isa', '?')}"
        f"{'; held by ' + held_text(t['held_by']) if t.get('held_by') else ''}, "
        f"native 16-bit {t.get('cpu_half', '?')}, "
        f"CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}); "
        f"GPU: {gpus}",
        "- Packages: "
        + "; ".join(
            f"{p['name']} {p['version']}" + ("" if p["imports"] else " (does not import)")
            for p in env.get("packages", {}).values()
            if p.get("version") and p["name"] != "torch"  # torch has its own line above
        ),
        "- Not installed: "
        + (", ".join(p["name"] for p in env.get("packages", {}).values() if not p.get("version")) or "none"),
        "",
        "## Version warnings",
        "",
    ]
    lines += [f"- {w}" for w in env.get("warnings", [])] or ["None."]
    s = report.get("summary") or summarize(report["scripts"])
    lines += [
        "",
        "## Scripts",
        "",
        " · ".join(f"**{k}** {s.get(k, 0)}" for k in STATUSES) + f" · of {len(report['scripts'])}",
        "",
        "Each script's name links to its log.",
        "",
        "| script | status | reason | time (s) | peak RSS (MB) | key figures |",
        "|---|---|---|---:|---:|---|",
    ]
    for e in report["scripts"]:
        figs = "; ".join(f"{k} = {_fmt(v)}" for k, v in list(e.get("figures", {}).items())[:3])
        name = f"[`{e['name']}`]({e['log']})" if e.get("log") else f"`{e['name']}`"
        lines.append(
            f"| {name} | {e['status']} | {_cell(e.get('reason', ''))[:160]} | "
            f"{e.get('seconds', 0):.1f} | {e.get('peak_rss_mb', 0):.0f} | {_cell(figs)} |"
        )
    warned = [e for e in report["scripts"] if e.get("warnings")]
    if warned:
        lines += ["", "## Warnings raised by the scripts", ""]
        for e in warned:
            uniq = list(dict.fromkeys(e["warnings"]))
            lines.append(
                f"- `{e['name']}`: "
                + "; ".join(_cell(w)[:200] for w in uniq[:5])
                + (f" (and {len(uniq) - 5} more)" if len(uniq) > 5 else "")
            )
    return "\n".join(lines) + "\n"


def _moved(a, b) -> bool:
    if (
        isinstance(a, bool)
        or isinstance(b, bool)
        or not isinstance(a, (int, float))
        or not isinstance(b, (int, float))
    ):
        return a != b
    if math.isnan(a) or math.isnan(b):
        return not (math.isnan(a) and math.isnan(b))
    scale = max(abs(a), abs(b))
    return scale > 0 and abs(a - b) / scale > MOVED


def compare_reports(old: dict, new: dict, selected=None) -> str:
    """What changed status, which scripts came or went, and which figures moved by more than 5 %.

    ``selected(name)`` says which scripts the new run chose (``--only``): the earlier report's other
    scripts were not run, not gone, and are only counted.
    """
    before = {e["name"]: e for e in old.get("scripts", [])}
    not_run = [n for n in before if selected is not None and not selected(n)]
    before = {n: e for n, e in before.items() if n not in not_run}
    after = {e["name"]: e for e in new.get("scripts", [])}
    lines = ["Compared with the earlier report:"]
    for name, e in after.items():
        if name not in before:
            lines.append(f"  new       {name}: {e['status']}")
            continue
        o = before[name]
        if o["status"] != e["status"]:
            lines.append(
                f"  status    {name}: {o['status']} -> {e['status']}"
                + (f" ({e['reason']})" if e.get("reason") else "")
            )
        for k in sorted(set(o.get("figures", {})) | set(e.get("figures", {}))):
            a, b = o.get("figures", {}).get(k), e.get("figures", {}).get(k)
            if a is None or b is None:
                if a != b:
                    lines.append(f"  figure    {name}: {k} {_fmt(a)} -> {_fmt(b)}")
            elif _moved(a, b):
                lines.append(f"  figure    {name}: {k} {_fmt(a)} -> {_fmt(b)}")
    for name in before:
        if name not in after:
            lines.append(f"  gone      {name}")
    if len(lines) == 1:
        lines.append("  nothing changed")
    if not_run:
        lines.append(f"  ({len(not_run)} script(s) of the earlier report not selected by --only this time)")
    return "\n".join(lines)
