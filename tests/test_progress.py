"""common.progress: a tqdm bar on a terminal, plain lines (no carriage returns) in logs and pipes."""

import io

from tqdm.auto import tqdm

from common.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar():
    bar = progress(total=5, desc="train", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_log_gets_a_plain_line_each_tenth_and_no_carriage_return():
    log = io.StringIO()
    bar = progress(total=40, desc="train", file=log)
    assert isinstance(bar, LineProgress)
    for step in range(40):
        bar.set_postfix({"loss": f"{1 / (step + 1):.3f}"})
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" (")[0] for line in lines] == [f"train: {n}/40" for n in range(4, 41, 4)]
    assert lines[-1].startswith("train: 40/40 (100%) ") and lines[-1].endswith(" s loss=0.025")


def test_iteration_and_a_resumed_start():
    log = io.StringIO()
    assert list(progress(range(3), desc="x", file=log)) == [0, 1, 2]
    assert log.getvalue().count("\n") == 3  # fewer steps than tenths: a line each
    log = io.StringIO()
    bar = progress(total=100, desc="train", initial=50, file=log)
    bar.update(5)
    assert log.getvalue() == ""  # the next line comes at 60, not at every step after a resume
    bar.update(5)
    assert log.getvalue().startswith("train: 60/100 (60%)")


def test_disabled_prints_nothing(capsys):
    bar = progress(total=3, desc="quiet", disable=True)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
