"""The decoder benchmark's quick mode runs end to end: same tokens and losses as HF, every contender
timed, and a report rebuilt from the JSON alone that is what the run printed. No timing is asserted:
speed is the full benchmark's business, not a unit test's. The chapter README's speed section is what
the committed results give."""

import json

from benchmarks import bench_decoder, speed_section


def test_bench_decoder_quick_writes_a_report_its_json_reproduces(tmp_path, capsys):
    out = tmp_path / "bench_decoder.json"
    bench_decoder.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())

    assert saved["same_tokens_as_hf"] is True
    assert saved["train_loss_max_abs_diff"] < 1e-4
    timed = {
        "ours (KV cache)",
        "ours (KV cache, row-major)",
        "HF generate",
        "ours (no cache)",
        "ours train step",
        "HF train step",
        bench_decoder.FLOOR,
        bench_decoder.SHORT_COL,
        bench_decoder.SHORT_ROW,
    }
    assert set(saved["seconds"]) == timed
    assert all(len(v) == saved["repeats"] and min(v) > 0 for v in saved["seconds"].values())
    assert set(saved["train_step_x_floor"]) == {"ours", "hf"}
    assert set(saved["ratios"]) == set(bench_decoder.GOALS)
    assert bench_decoder.report(saved, header=False) in printed
    assert bench_decoder.report(saved).startswith(saved["setup"])


def test_readme_speed_section_shows_the_committed_results():
    assert speed_section.main(["--check"]) == 0, "run `python -m benchmarks.speed_section`"
