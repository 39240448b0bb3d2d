"""The benchmarks' quick modes run end to end: the decoder benchmark gives the same tokens and losses
as HF, the MoE benchmark the same outputs as transformers' blocks, every contender is timed, the
library columns record their settings, and the reports and the README's speed section can be built
from the JSON alone. No timing is asserted: speed is the full benchmarks' business, not a unit
test's. The chapter README's speed section is what the committed results give."""

import json

import pytest

from benchmarks import bench_decoder, bench_moe, speed_section


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_decoder.json"
    result = bench_decoder.main(["--quick", "--json", str(out)])
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_moe.json"
    bench_moe.main(["--quick", "--repeats", "1", "--warmup", "1", "--json", str(out)])
    return json.loads(out.read_text())


def test_bench_decoder_quick_writes_a_report_its_json_reproduces(decoder_run):
    result, saved = decoder_run
    assert saved == json.loads(json.dumps(result))
    printed = bench_decoder.report(result, header=False)

    assert saved["same_tokens_as_hf"] is True
    assert saved["train_loss_max_abs_diff"] < 1e-4
    timed = {
        "ours (KV cache)",
        bench_decoder.COLUMN_MAJOR,
        "HF generate",
        "ours (no cache)",
        "ours train step",
        "HF train step",
        bench_decoder.FLOOR,
    }
    assert set(saved["seconds"]) == timed
    assert all(len(v) == saved["repeats"] and min(v) > 0 for v in saved["seconds"].values())
    assert set(saved["train_step_x_floor"]) == {"ours", "hf"}
    assert set(saved["ratios"]) == set(bench_decoder.GOALS)
    assert set(saved["goals_met"]) == {*bench_decoder.GOALS, "train_step_x_floor"}
    assert saved["malloc"] == "freed memory kept" and saved["hf_settings"]["attn_implementation"]
    assert bench_decoder.report(saved, header=False) == printed
    assert bench_decoder.report(saved).startswith(saved["setup"])


def test_bench_moe_quick_times_default_and_eager_blocks_with_equal_outputs(moe_run):
    assert moe_run["malloc"] == "freed memory kept"
    for r in moe_run["results"]:
        assert {"ours", "HF Mixtral", "HF Mixtral eager", "HF DeepseekV3", "HF DeepseekV3 eager"} <= set(
            r["x_floor"]
        )
        # transformers' default for a model built normally, recorded; eager only as the extra column
        assert "'grouped_mm' (default)" in r["settings"]["HF Mixtral"]
        assert "'eager'" in r["settings"]["HF Mixtral eager"]
        assert r["max_abs_diff"] and max(r["max_abs_diff"].values()) < 1e-4  # the same layer, same weights
        assert set(r["measured"]) == set(r["config"]["goals"]) == set(r["goals_met"])
        assert all(len(ts) == moe_run["repeats"] and min(ts) > 0 for ts in r["seconds"].values())
    decode = next(r for r in moe_run["results"] if not r["config"]["train"])
    assert "read active weights" in decode["x_floor"] and decode["active_experts"] > 0
    assert bench_moe.COLUMN_MAJOR in decode["x_floor"] and decode["column_major_copy_mb"] > 0
    assert decode["max_abs_diff"][f"{bench_moe.COLUMN_MAJOR} vs HF Mixtral"] < 1e-4
    assert decode["one_thread"]["x_bound"] > 0 and set(decode["one_thread"]["median_s"]) == {
        bench_moe.COLUMN_MAJOR,
        "read active weights",
    }


def test_speed_section_is_built_from_fresh_results(decoder_run, moe_run):
    text = speed_section.section(decoder_run[1], moe_run)
    assert text.startswith(speed_section.HEADING)
    assert bench_moe.table(moe_run["results"]) in text
    assert "grouped_mm" in text
    # the column-major copy is named as the opt-in it is, with its memory, beside plain generate
    assert "DecodeLayout" in text and "plain `generate`" in text


def test_readme_speed_section_shows_the_committed_results():
    assert speed_section.main(["--check"]) == 0, "run `python -m benchmarks.speed_section`"


def test_bench_quant_writes_what_the_readme_block_is_built_from(tmp_path, monkeypatch):
    from benchmarks import bench_quant

    small = dict(vocab_size=256, context_length=64, n_layer=1, d_model=128, n_head=2, n_kv_head=2)
    monkeypatch.setattr(bench_quant, "MODELS", {n: small | bench_quant.ARCH for n in ("tiny", "base")})
    out = tmp_path / "bench_quant.json"
    payload = bench_quant.main(["--quick", "--repeats", "1", "--new-tokens", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload)) and saved["format"] == bench_quant.FORMAT
    names = {bench_quant.FP32, bench_quant.PLAIN, bench_quant.INT4, bench_quant.INT4_FP32, bench_quant.INT8}
    for r in saved["results"]:
        assert set(r["times"]) == names and all(len(t) == 1 and t[0] > 0 for t in r["times"].values())
        assert set(r["speedup_over_fp32"]) == names - {bench_quant.FP32}
        assert "int4 kernel" in r["int4_paths"] and "int8 kernel" in r["int8_paths"]
        assert r["int4_bytes"] < r["int8_bytes"] < r["fp32_bytes"]
    block = speed_section.quant_block(saved)
    assert bench_quant.table(saved["results"]) in block and "interleaved rounds" in block
    with pytest.raises(SystemExit):
        bench_quant.main(["--repeats", "0"])
