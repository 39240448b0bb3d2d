"""common.pretrained: the small LM is trained once, cached, reloaded identically, retrained when corrupt."""

import json
import math

import pytest
import torch

from common import checkpoint as ckpt
from common.pretrained import SPECS, pretrained_lm, spec_key


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def first(cache):
    return pretrained_lm("test", progress=False, cache=cache)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_trains_a_real_lm_on_first_use(first):
    from common.models.decoder import DecoderLM

    model, tokenizer, info = first
    assert isinstance(model, DecoderLM) and not info["cached"]
    assert info["steps"] == SPECS["test"]["train"]["steps"]
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert tokenizer.get_vocab_size() == model.config.vocab_size == SPECS["test"]["vocab_size"]
    # it learned: well below the uniform guess of ln(vocab) nats per token
    assert info["val_loss"] < math.log(model.config.vocab_size) - 0.8
    assert 0 < info["val_bpb"] < 8 and info["seconds"] > 0
    # and the tokenizer it returns is the one it was trained with: a prompt's loss agrees
    ids = torch.tensor([tokenizer.encode('The "if" statement is used for conditional execution').ids])
    _, loss = model(ids[:, :-1], ids[:, 1:])
    assert loss.item() < math.log(model.config.vocab_size)


def test_second_call_loads_identical_weights(first, cache):
    model, _, info = first
    again, _, info2 = pretrained_lm("test", progress=False, cache=cache)
    assert info2["cached"]
    assert _same_weights(model, again)
    assert info2["val_loss"] == info["val_loss"]


def test_corrupt_cache_is_retrained(first, cache, capsys):
    model, _, _ = first
    folder = next(p for p in cache.glob("pretrained-test-*") if p.is_dir())
    weights = folder / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    retrained, _, info = pretrained_lm("test", progress=False, cache=cache)
    assert not info["cached"] and "corrupt" in capsys.readouterr().out
    assert _same_weights(model, retrained)  # training is deterministic: the same model again

    record = json.loads((folder / "info.json").read_text())
    record["weights_sha256"] = "0" * 64  # a checksum that does not match the weights
    (folder / "info.json").write_text(json.dumps(record))
    _, _, info = pretrained_lm("test", progress=False, cache=cache)
    assert not info["cached"]
    assert pretrained_lm("test", progress=False, cache=cache)[2]["cached"]  # repaired cache is used again


def test_unknown_name():
    with pytest.raises(ValueError, match="tiny"):
        spec_key("huge", "text")
