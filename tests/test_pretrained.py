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


def _folder(cache):
    return next(p for p in cache.glob("pretrained-test-*") if p.is_dir())


@pytest.mark.parametrize(
    "edit",
    [
        lambda info: {**info, "val_loss": 0.001},  # an edited figure
        lambda info: {k: v for k, v in info.items() if k != "config"},  # a missing field
        lambda info: {k: v for k, v in info.items() if k != "config"} | {"info_sha256": "0" * 64},
        lambda info: [info],  # not an object
        None,  # truncated
    ],
    ids=["edited-figure", "missing-config", "missing-config-bad-checksum", "not-an-object", "truncated"],
)
def test_an_edited_or_partial_info_json_fails_the_check(first, cache, edit):
    """(``test_corrupt_cache_is_retrained`` shows that a failed check retrains.)"""
    from common.data import load_corpus
    from common.pretrained import _info_digest, _load

    folder, key = _folder(cache), spec_key("test", load_corpus())
    info_path = folder / "info.json"
    good = info_path.read_text()
    assert _load(folder, "test", key, "cpu") is not None
    info = json.loads(good)
    assert info["info_sha256"] == _info_digest(info)
    try:
        info_path.write_text(json.dumps(edit(info)) if edit else good[:50])
        assert _load(folder, "test", key, "cpu") is None
    finally:
        info_path.write_text(good)


MINI = (
    "import json, sys; from common import pretrained as P\n"
    "P.SPECS['mini'] = {**P.SPECS['test'], 'train': {**P.SPECS['test']['train'], 'steps': 3}}\n"
    "_, _, info = P.pretrained_lm('mini', progress=True, cache=sys.argv[1])\n"
    "print(json.dumps({'cached': info['cached'], 'val_loss': info['val_loss']}))\n"
)


def test_two_first_uses_at_once_train_once(first, cache, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    fresh = tmp_path / "cache"
    fresh.mkdir()
    for tokenizer in cache.glob("tokenizer-*.json"):  # the tokenizer is not what this test is about
        shutil.copy(tokenizer, fresh)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", MINI, str(fresh)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert sorted(r["cached"] for r in results) == [False, True]  # one trained, the other loaded it
    assert results[0]["val_loss"] == results[1]["val_loss"]
    assert sum("training a" in out for out in outputs) == 1
