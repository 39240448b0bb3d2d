"""Chapter README samples: a harness log cleaned into what a reader saw, and the committed READMEs
equal to what the committed logs give."""

import pytest

from verify import samples

LOG = (
    "$ /usr/bin/python -m ch09_x.s9_1_1_a --json out.json --device cpu\n"
    "[2026-01-01 00:00:00,000] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator"
    " to CPU.\n"
    "USDT:2026-11-23 22:32:42 13729:13729 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
    "W1123 22:32:38.165000 13729 site-packages/torch/onnx/_internal/exporter/_registration.py:107] "
    "torchvision is not installed. Skipping torchvision::nms\n"
    "data: 10 tokens\n"
    "\n"
    "train:   0%|          | 0/4 [00:00<?, ?it/s]\rtrain:  50%|#####     | 2/4 [00:01<00:01,  2.00it/s]"
    "\r                    \rstep     2: loss 1.0\n"
    "train: 100%|##########| 4/4 [00:02<00:00,  2.00it/s]\n"
    "\n"
    "   a: 1\n"
    "   b: 2\n"
    "   c: 3\n"
    "done\n"
    "\n"
    "figures\n"
    "-------\n"
    "loss  1.0\n"
)


def test_clean_drops_the_command_progress_warning_and_figures():
    assert samples.clean(LOG) == "data: 10 tokens\nstep     2: loss 1.0\n\n   a: 1\n   b: 2\n   c: 3\ndone"


def test_omit_turns_each_run_of_matching_lines_into_one_ellipsis():
    assert samples.clean(LOG, omit=r"^   [ab]:").endswith("\n   ...\n   c: 3\ndone")


def test_rewrite_replaces_only_the_sample_blocks(tmp_path):
    (tmp_path / "ch09_x__s9_1_1_a.log").write_text(LOG)
    readme = (
        "# Chapter\n\n```\n$ python -m ch09_x.s9_1_1_a --quick\nold output\n```\n\n"
        "```bash\npython -m ch09_x.s9_1_1_a\n```\n"
    )
    new = samples.rewrite(readme, tmp_path)
    assert new.startswith("# Chapter\n\n```\n$ python -m ch09_x.s9_1_1_a --quick\ndata: 10 tokens\n")
    assert "old output" not in new
    assert new.endswith("done\n```\n\n```bash\npython -m ch09_x.s9_1_1_a\n```\n")  # not a sample: kept


def test_committed_readmes_show_the_committed_full_report():
    assert samples.main(["--check"]) == 0, "run `python -m verify.samples` after a new report"


def test_a_sample_without_a_log_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ch09_x.s9_9_9_missing"):
        samples.rewrite("```\n$ python -m ch09_x.s9_9_9_missing\n```\n", tmp_path)


def test_clean_drops_the_plain_progress_lines_of_a_log():
    log = LOG.replace("data: 10 tokens\n", "data: 10 tokens\ntrain: 4/40 (10%) 1 s loss=3.210, lr=1.00\n")
    assert "train: 4/40" not in samples.clean(log)
    assert samples.clean(log) == samples.clean(LOG)


def test_the_reports_plots_follow_their_sample_and_are_rewritten(tmp_path):
    report = tmp_path / "verify" / "reports" / "cpu-full"
    (report / "logs").mkdir(parents=True)
    (report / "logs" / "ch09_x__s9_1_1_a.log").write_text(LOG)
    chapter = tmp_path / "ch09_x"
    chapter.mkdir()
    readme = "# Chapter\n\n```\n$ python -m ch09_x.s9_1_1_a\nold\n```\n\nAfter.\n"
    assert samples.rewrite(readme, report / "logs", chapter) == samples.rewrite(
        readme, report / "logs"
    )  # none
    plots = report / "plots" / "ch09_x__s9_1_1_a"
    (plots / "sub").mkdir(parents=True)
    (plots / "loss.png").write_bytes(b"png")
    (plots / "sub" / "curve.png").write_bytes(b"png")
    new = samples.rewrite(readme, report / "logs", chapter)
    region = (
        "```\n\n<!-- plots -->\n"
        "![loss](../verify/reports/cpu-full/plots/ch09_x__s9_1_1_a/loss.png)\n"
        "![curve](../verify/reports/cpu-full/plots/ch09_x__s9_1_1_a/sub/curve.png)\n"
        "<!-- /plots -->\n\nAfter.\n"
    )
    assert new.endswith("done\n" + region)
    assert samples.rewrite(new, report / "logs", chapter) == new  # stable: the region is rewritten in place
    (plots / "sub" / "curve.png").unlink()
    fewer = samples.rewrite(new, report / "logs", chapter)
    assert "curve" not in fewer and fewer.count("<!-- plots -->") == 1
    (plots / "loss.png").unlink()
    assert samples.rewrite(fewer, report / "logs", chapter) == samples.rewrite(readme, report / "logs")


def test_a_plot_the_log_names_but_the_report_lacks_is_found(tmp_path):
    """A script prints where it saved each plot; a report entry without that PNG would leave the README
    naming a picture it cannot show (verify.samples exits 1 on it, with --check too)."""
    logs = tmp_path / "report" / "logs"
    logs.mkdir(parents=True)
    (logs / "ch09_x__s9_1_1_a.log").write_text(
        LOG + "plot: runs/s9_1_1_a/curve.png\nand runs/s9_1_1_a/other.png\n"
    )
    assert samples.missing_plots("ch09_x__s9_1_1_a", logs) == ["curve.png", "other.png"]
    kept = tmp_path / "report" / "plots" / "ch09_x__s9_1_1_a"
    kept.mkdir(parents=True)
    (kept / "curve.png").write_bytes(b"\x89PNG")
    assert samples.missing_plots("ch09_x__s9_1_1_a", logs) == ["other.png"]
    assert samples.missing_plots("ch09_x__s9_9_9_none", logs) == []
