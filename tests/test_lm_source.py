"""common.lm_source: the project's LM and a local Hugging Face folder give one interface and one
evaluation; a bad --hf-path is a one-line error."""

import argparse

import pytest
import torch

from common.lm_source import (
    HFCausalLM,
    add_source_args,
    evaluate_lm,
    load_for_compression,
    load_hf_folder,
    load_pretrained,
    load_source,
    save_hf_folder,
)
from common.pretrained import pretrained_lm


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model, tokenizer, _ = pretrained_lm("test", progress=False)
    return save_hf_folder(model, tokenizer, str(tmp_path_factory.mktemp("hf") / "test-llama"))


def test_hf_folder_round_trip(hf_folder):
    ours = load_pretrained("test")
    theirs = load_hf_folder(hf_folder)
    assert type(theirs.model).__name__ == "DecoderLM" and theirs.kind == "hf"
    assert torch.equal(ours.data.val, theirs.data.val)
    assert torch.equal(ours.data.token_bytes, theirs.data.token_bytes[: len(ours.data.token_bytes)])
    a = evaluate_lm(ours.model, ours.data, max_batches=2)
    b = evaluate_lm(theirs.model, theirs.data, max_batches=2)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["bpb"] == pytest.approx(b["bpb"], rel=1e-5)
    assert a["ppl"] == pytest.approx(torch.tensor(a["loss"]).exp().item())
    assert theirs.decode(theirs.encode("A class is")) == "A class is"


def test_other_architecture_is_wrapped(tmp_path, hf_folder):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).save_pretrained(path)
    AutoTokenizer.from_pretrained(hf_folder).save_pretrained(path)
    source = load_hf_folder(str(path))
    assert isinstance(source.model, HFCausalLM) and source.data.context_length == 64
    result = evaluate_lm(source.model, source.data, max_batches=1)
    assert abs(result["loss"] - torch.log(torch.tensor(512.0)).item()) < 0.5  # untrained: near uniform
    with pytest.raises(ValueError, match="needs a Llama-architecture model.*gpt2"):
        source.decoder("structured pruning")


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    add_source_args(parser)
    return parser, parser.parse_args(argv)


@pytest.mark.parametrize("make", ["missing", "empty", "no_weights"])
def test_bad_hf_path_is_a_one_line_error(tmp_path, capsys, make):
    path = tmp_path / "folder"
    if make != "missing":
        path.mkdir()
    if make == "no_weights":
        (path / "config.json").write_text("{}")
    parser, args = parse(["--hf-path", str(path)])
    with pytest.raises(SystemExit) as e:
        load_source(parser, args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = {"missing": "no such folder", "empty": "no config.json", "no_weights": "no weights"}[make]
    assert expected in err and "--hf-path" in err


@pytest.mark.parametrize(
    "bits, group, samples, expected",
    [((4,), 48, 4, "group"), ((5,), 32, 4, "bit"), ((4,), 32, 10**6, "calibration")],
)
def test_compression_start_refuses_impossible_flags(capsys, bits, group, samples, expected):
    """A group size that does not divide the width, an unsupported bit width, more calibration windows
    than the training split holds: one-line usage errors before any work."""
    parser, args = parse(["--model", "test"])
    args.group_size, args.calib_samples = group, samples
    with pytest.raises(SystemExit) as e:
        load_for_compression(parser, args, "a test", bits=bits)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1].lower()


def test_compression_start_gives_model_and_windows(capsys):
    parser, args = parse(["--model", "test"])
    args.group_size, args.calib_samples = 32, 3
    source, model, windows = load_for_compression(parser, args, "a test", bits=(4, 3))
    assert windows.shape == (3, model.config.context_length) and "calibration: (3," in capsys.readouterr().out
