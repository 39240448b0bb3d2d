"""The verify harness on a throwaway chapter folder holding one script of every kind of outcome."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO_ROOT
from verify.harness import discover
from verify.report import compare_reports

HEADER = "from common.runner import run_script, script_parser\n"
SCRIPTS = {
    "s1_1_pass.py": '''
        """passes, and draws a plot into its default output folder"""
        import os
        def main(argv=None):
            args = script_parser(__doc__).parse_args(argv)
            os.makedirs("runs/s1_1_pass/curves", exist_ok=True)
            open("runs/s1_1_pass/curves/loss.png", "wb").write(b"\\x89PNG\\r\\n\\x1a\\n")
            return {"accuracy": 0.97, "quick": args.quick, "loss": 0.25}
    ''',
    "s1_2_fail.py": '''
        """fails"""
        def main(argv=None):
            raise ValueError("expected 3 heads, got 4")
    ''',
    "s1_3_skip.py": '''
        """skips"""
        from common.runner import SkipScript
        def main(argv=None):
            raise SkipScript("needs a CUDA GPU", "pip install tensorrt")
    ''',
    "s1_4_hang.py": '''
        """hangs, with a child process"""
        import subprocess, sys, time, os
        def main(argv=None):
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open(os.environ["HANG_PID_FILE"], "w").write(str(child.pid))
            time.sleep(600)
    ''',
    "s1_5_crash.py": '''
        """crashes hard: a segmentation fault, no Python traceback, no figures file"""
        import ctypes
        def main(argv=None):
            print("about to crash", flush=True)
            ctypes.string_at(0)
    ''',
    "s1_6_warn.py": '''
        """passes with warnings"""
        import warnings
        def main(argv=None):
            warnings.warn("old API", FutureWarning)
            return {"value": 1.0}
    ''',
    "s1_7_garbage.py": '''
        """prints bytes that are not text and writes a figures file that is not JSON, then exits 0"""
        import sys, os
        def main(argv=None):
            sys.stdout.buffer.write(bytes(range(256)) * 50 + b"\\n")
            sys.stdout.flush()
            path = argv[argv.index("--json") + 1]
            open(path, "w").write("{not json")
            os._exit(0)
    ''',
}


def make_tree(root, scripts):
    chapter = root / "ch99_fake"
    chapter.mkdir(parents=True)
    stale = root / "runs" / "s1_1_pass" / "stale.png"  # from an earlier run: not this run's plot
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    os.utime(stale, (946684800, 946684800))
    for name, body in scripts.items():
        (chapter / name).write_text(
            HEADER + textwrap.dedent(body) + '\nif __name__ == "__main__":\n    run_script(main)\n'
        )
    return root


def harness(root, out, *flags, env_extra=None, wait=True):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "verify", "--root", str(root), "--out", str(out), *flags]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("book"), SCRIPTS)
    out = root / "out"
    pid_file = root / "hang.pid"
    proc = harness(root, out, "--quick", "--timeout", "6", env_extra={"HANG_PID_FILE": str(pid_file)})
    report = json.loads((out / "report.json").read_text())
    return {
        "proc": proc,
        "report": report,
        "by": {e["name"].split("/")[-1]: e for e in report["scripts"]},
        "out": out,
        "root": root,
        "hang_pid": int(pid_file.read_text()),
    }


def test_schema(run):
    r = run["report"]
    assert set(r) == {"environment", "scripts", "summary"}
    assert isinstance(r["environment"]["warnings"], list)
    keys = {
        "name",
        "status",
        "reason",
        "exit_code",
        "seconds",
        "peak_rss_mb",
        "warnings",
        "figures",
        "log",
        "plots",
    }
    for e in r["scripts"]:
        assert set(e) == keys, e
        assert e["status"] in {"PASS", "FAIL", "SKIP", "TIMEOUT"}
        assert (run["out"] / e["log"]).exists()
    assert [e["name"] for e in r["scripts"]] == [f"ch99_fake/{n}" for n in SCRIPTS]


def test_statuses_and_reasons(run):
    by = run["by"]
    assert by["s1_1_pass.py"]["status"] == "PASS" and by["s1_1_pass.py"]["exit_code"] == 0
    assert by["s1_1_pass.py"]["figures"] == {"accuracy": 0.97, "quick": True, "loss": 0.25}
    assert by["s1_1_pass.py"]["peak_rss_mb"] > 5
    assert by["s1_2_fail.py"]["status"] == "FAIL" and by["s1_2_fail.py"]["exit_code"] == 1
    assert by["s1_2_fail.py"]["reason"] == "ValueError: expected 3 heads, got 4"
    assert by["s1_3_skip.py"]["status"] == "SKIP" and by["s1_3_skip.py"]["exit_code"] == 77
    assert "needs a CUDA GPU" in by["s1_3_skip.py"]["reason"] and "tensorrt" in by["s1_3_skip.py"]["reason"]
    assert by["s1_4_hang.py"]["status"] == "TIMEOUT" and "6 s" in by["s1_4_hang.py"]["reason"]
    assert 6 <= by["s1_4_hang.py"]["seconds"] < 30
    assert by["s1_4_hang.py"]["peak_rss_mb"] > 0  # collected from the script it ended
    crash = by["s1_5_crash.py"]
    assert (
        crash["status"] == "FAIL"
        and crash["reason"] == "killed by signal SIGSEGV"
        and crash["exit_code"] == -11
    )
    assert by["s1_6_warn.py"]["status"] == "PASS"
    assert by["s1_6_warn.py"]["warnings"] and by["s1_6_warn.py"]["warnings"][0].startswith(
        "FutureWarning: old API"
    )
    garbage = by["s1_7_garbage.py"]
    assert garbage["status"] == "PASS" and "unreadable figures file" in garbage["reason"]


def test_summary_exit_code_and_markdown(run):
    assert run["report"]["summary"] == {"PASS": 3, "FAIL": 2, "SKIP": 1, "TIMEOUT": 1}
    assert run["proc"].returncode == 1
    md = (run["out"] / "report.md").read_text()
    assert "| [`ch99_fake/s1_4_hang.py`](logs/ch99_fake__s1_4_hang.log) | TIMEOUT |" in md  # linked log
    assert "accuracy = 0.97" in md
    assert "Version warnings" in md
    packages = next(line for line in md.splitlines() if line.startswith("- Packages: "))
    assert not any(p.startswith("torch ") for p in packages.removeprefix("- Packages: ").split("; "))
    assert md.count(f"torch {run['report']['environment']['torch']['version']} ") == 1  # its own line only
    assert run["proc"].stdout.count("] PASS") == 3  # one progress line per script


def test_hang_killed_with_its_children(run):
    deadline = time.time() + 10
    while pid_alive(run["hang_pid"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not pid_alive(run["hang_pid"])


def test_compare_reports(run):
    old = json.loads(json.dumps(run["report"]))
    by = {e["name"]: e for e in old["scripts"]}
    by["ch99_fake/s1_1_pass.py"]["figures"]["accuracy"] = 0.5
    by["ch99_fake/s1_1_pass.py"]["figures"]["loss"] = 0.251  # moved < 5 %: not reported
    by["ch99_fake/s1_2_fail.py"]["status"] = "PASS"
    old["scripts"].append({**by["ch99_fake/s1_1_pass.py"], "name": "ch99_fake/s0_removed.py"})
    text = compare_reports(old, run["report"])
    assert "status    ch99_fake/s1_2_fail.py: PASS -> FAIL" in text
    assert "accuracy 0.5 -> 0.97" in text and "loss" not in text
    assert "gone      ch99_fake/s0_removed.py" in text
    assert "nothing changed" in compare_reports(run["report"], run["report"])


def test_plots_of_this_run_are_copied_into_the_report(run):
    assert run["by"]["s1_1_pass.py"]["plots"] == ["plots/ch99_fake__s1_1_pass/curves/loss.png"]
    assert (run["out"] / "plots" / "ch99_fake__s1_1_pass" / "curves" / "loss.png").exists()
    assert not list(run["out"].rglob("stale.png"))  # written before the run: not this run's
    assert run["by"]["s1_2_fail.py"]["plots"] == []


def test_only_list_and_compare_flag(run, tmp_path):
    import shutil

    listed = harness(run["root"], tmp_path, "--list", "--only", "pass", "--only", "*warn*")
    assert listed.stdout.split() == ["ch99_fake/s1_1_pass.py", "ch99_fake/s1_6_warn.py"]
    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    again = harness(
        run["root"], out, "--only", "s1_1", "--timeout", "0", "--compare", str(run["out"] / "report.json")
    )
    assert again.returncode == 0, again.stderr
    assert "gone" not in again.stdout  # the scripts --only left out are not gone
    assert "(6 script(s) of the earlier report not selected by --only this time)" in again.stdout
    assert (
        f"note: {out / 'report.json'} held 6 other script(s) (ch99_fake/s1_2_fail.py, "
        "ch99_fake/s1_3_skip.py, ch99_fake/s1_4_hang.py, ...); "
        "this --only run replaces it (--update keeps them)"
    ) in again.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["run"]["timeout"] == 0 and "no time limit" in again.stdout
    assert discover(run["root"], ["nothing-matches"]) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read {}: No such file or directory"),
        ("{not json", "{} is not JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "{} is not a verify report (no list of scripts)"),
        ('{"scripts": "all"}', "{} is not a verify report (no list of scripts)"),
        ('{"scripts": [{"name": "a.py"}]}', "{}: a.py has no status of PASS, FAIL, SKIP, TIMEOUT"),
        (
            '{"scripts": [{"name": "a.py", "status": "PASS", "figures": [1]}]}',
            "{}: the figures of a.py are not",
        ),
    ],
    ids=["missing", "malformed", "not-an-object", "no-list", "no-status", "figures-a-list"],
)
def test_a_bad_compare_file_is_refused_before_anything_runs(run, tmp_path, content, message):
    old = tmp_path / "old.json"
    if content is not None:
        old.write_text(content)
    proc = harness(run["root"], tmp_path / "out", "--compare", str(old))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(
        "python -m verify: error: argument --compare: " + message.format(old)
    )
    assert "collecting the environment" not in proc.stdout and not (tmp_path / "out").exists()


def test_only_without_a_match_and_impossible_timeouts_are_usage_errors(run, tmp_path):
    proc = harness(run["root"], tmp_path, "--only", "zzz", "--only", "s9_*")
    assert proc.returncode == 2
    root = run["root"].resolve()
    assert proc.stderr.splitlines()[-1] == (
        f"python -m verify: error: no section script under {root} matches --only 'zzz' 's9_*'"
    )
    for bad in ("-5", "nan", "inf", "soon"):
        proc = harness(run["root"], tmp_path, "--timeout", bad)
        assert proc.returncode == 2 and "argument --timeout" in proc.stderr


def test_interrupt_keeps_the_lines_written(tmp_path):
    scripts = {
        "s1_1_pass.py": SCRIPTS["s1_1_pass.py"],
        "s1_2_interrupt.py": '''
            """interrupts the harness that runs it, as Ctrl-C would"""
            import os, signal, time
            def main(argv=None):
                os.kill(os.getppid(), signal.SIGINT)
                time.sleep(60)
        ''',
        "s1_3_never.py": SCRIPTS["s1_1_pass.py"],
    }
    root = make_tree(tmp_path, scripts)
    proc = harness(root, root / "out", "--timeout", "30")
    assert proc.returncode == 130
    report = json.loads((root / "out" / "report.json").read_text())
    assert [(e["name"].split("/")[-1], e["status"]) for e in report["scripts"]] == [
        ("s1_1_pass.py", "PASS"),
        ("s1_2_interrupt.py", "FAIL"),
    ]
    assert "interrupted" in report["scripts"][1]["reason"]


def test_report_written_after_every_script(tmp_path):
    scripts = {"s1_1_pass.py": SCRIPTS["s1_1_pass.py"], "s1_2_hang.py": SCRIPTS["s1_4_hang.py"]}
    root = make_tree(tmp_path, scripts)
    out = root / "out"
    proc = harness(root, out, "--timeout", "60", env_extra={"HANG_PID_FILE": str(root / "pid")}, wait=False)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                report = json.loads((out / "report.json").read_text())
            except (OSError, ValueError):
                report = {"scripts": []}
            if report["scripts"]:
                break
            time.sleep(0.2)
        # the first script's line is on disk while the second still hangs
        assert [e["status"] for e in report["scripts"]] == ["PASS"]
        assert proc.poll() is None
        while not (root / "pid").exists() and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    child = int((root / "pid").read_text())
    deadline = time.time() + 10
    while pid_alive(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not pid_alive(child)


def test_update_refreshes_part_of_a_report(tmp_path):
    root = make_tree(tmp_path / "book", {k: SCRIPTS[k] for k in ("s1_1_pass.py", "s1_6_warn.py")})
    out = tmp_path / "out"
    first = harness(root, out, "--quick", "--only", "s1_1")
    assert first.returncode == 0, first.stdout + first.stderr
    second = harness(root, out, "--quick", "--only", "s1_6", "--update")
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads((out / "report.json").read_text())
    names = [e["name"].split("/")[-1] for e in report["scripts"]]
    assert names == ["s1_1_pass.py", "s1_6_warn.py"]  # the kept entry, then the new one, in book order
    assert report["environment"]["run"]["kept_from_earlier_run"] == ["ch99_fake/s1_1_pass.py"]
    assert report["summary"]["PASS"] == 2
    without = harness(root, out, "--quick", "--only", "s1_6")  # no --update: a fresh report
    assert [e["name"] for e in json.loads((out / "report.json").read_text())["scripts"]] == [
        "ch99_fake/s1_6_warn.py"
    ]
    assert without.returncode == 0
    mixed = harness(root, out, "--only", "s1_1", "--update")  # a full run cannot update a quick report
    assert mixed.returncode != 0 and "quick-mode report" in mixed.stderr

    report["environment"]["cpu_flags"] = ["avx", "avx2", "amx_bf16"]  # as if measured on another CPU
    (out / "report.json").write_text(json.dumps(report))
    other = harness(root, out, "--quick", "--only", "s1_1", "--update")
    assert other.returncode == 1
    (line,) = [ln for ln in other.stderr.splitlines() if ln.startswith("--update:")]
    assert "(avx avx2 amx_bf16;" in line and "an update would mix the two in one report" in line
    assert "[1/1]" not in other.stdout  # refused before any script ran

    (out / "report.json").write_text('{"scripts": [')  # cut off mid-write
    corrupt = harness(root, out, "--quick", "--only", "s1_1", "--update")
    assert corrupt.returncode == 1 and "[1/1]" not in corrupt.stdout
    assert f"--update: {out / 'report.json'} is not a readable verify report" in corrupt.stderr


def test_an_out_that_cannot_be_written_is_a_usage_error(tmp_path):
    root = make_tree(tmp_path / "book", {"s1_1_pass.py": SCRIPTS["s1_1_pass.py"]})
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    proc = harness(root, a_file / "report")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(
        "python -m verify: error: argument --out: cannot write into "
    )


def test_peak_rss_is_the_scripts_own(tmp_path):
    """A light script reports little, a heavy one at least what it allocated: the harness's own
    memory (the environment report imports torch, transformers, ...) must not leak into either."""
    heavy = '''
        """holds 400 MB"""
        def main(argv=None):
            block = bytearray(400 * 2**20)  # zero-filled, so every page is touched
            return {"mb": len(block) // 2**20}
    '''
    root = make_tree(tmp_path / "book", {"s1_1_pass.py": SCRIPTS["s1_1_pass.py"], "s1_2_heavy.py": heavy})
    proc = harness(root, tmp_path / "out", "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rss = {
        e["name"].split("/")[-1]: e["peak_rss_mb"]
        for e in json.loads((tmp_path / "out" / "report.json").read_text())["scripts"]
    }
    assert rss["s1_2_heavy.py"] >= 400
    assert rss["s1_1_pass.py"] < 150, rss
