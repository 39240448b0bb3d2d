"""The 4.3 scripts refuse bad input before any work with argparse's one-line error (exit 2)."""

import importlib
import json

import pytest

CASES = [
    ("s4_3_1_scaling_analysis", ["--models", "not-a-model"], "unknown model 'not-a-model'"),
    ("s4_3_1_scaling_analysis", ["--models", "{bert}"], "model_type 'bert' is not supported"),
    ("s4_3_3_low_rank", ["--ranks", "1000"], "rank 1000 is larger than the matrices allow"),
    ("s4_3_3_low_rank", ["--lora-rank", "0"], "argument --lora-rank: the value must be from 1 to"),
    ("s4_3_3_unstructured_pruning", ["--sparsities", "0.5", "1.0"], "a finite number in [0, 1), got 1.0"),
    ("s4_3_3_unstructured_pruning", ["--sparsities", "-0.1"], "a finite number in [0, 1), got -0.1"),
    ("s4_3_3_unstructured_pruning", ["--threads", "0"], "argument --threads: the value must be from 1 to"),
    ("s4_3_3_structured_pruning", ["--ratios", "0.75"], "leaves no heads"),
    ("s4_3_3_structured_pruning", ["--ratios", "1.0"], "a finite number in [0, 1), got 1.0"),
    ("s4_3_2_onnx", ["--hf-path", "{missing}"], "no such folder"),
    ("s4_3_3_low_rank", ["--hf-path", "{empty}"], "no config.json"),
]


@pytest.mark.parametrize("script, argv, message", CASES)
def test_bad_input_is_a_one_line_error(script, argv, message, tmp_path, capsys):
    bert = tmp_path / "bert" / "config.json"
    bert.parent.mkdir()
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "empty").mkdir()
    paths = {"{bert}": str(bert), "{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty")}
    argv = [paths.get(a, a) for a in argv]
    main = importlib.import_module(f"ch04_transformer_moe.{script}").main
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--device", "cpu", "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err[-1]
