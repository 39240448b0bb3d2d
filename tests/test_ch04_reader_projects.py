"""The reader projects of chapter 4: the translation task of s4_1_1 and the two training recipes of s4_1_4."""

import argparse

import pytest
import torch
from torch import nn

from ch04_transformer_moe import s4_1_1_transformer as s411
from ch04_transformer_moe import s4_1_4_train_lm as s414
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.feedforward import MLP, SwiGLU
from common.models.norms import RMSNorm
from common.training import TrainConfig, build_optimizer, split_parameters

# ----------------------------------------------------------------------------- translation data


def test_held_out_numbers_never_trained_in_any_language():
    train, test = s411.make_split(2000, 150, seed=3)
    assert len(test) == 150 and sorted(train + test) == list(range(2000))
    assert not set(train) & set(test)
    assert s411.make_split(2000, 150, seed=3) == (train, test)  # deterministic
    train_pairs = s411.parallel_corpus(train, ["de", "fr"])
    test_pairs = s411.parallel_corpus(test, ["de", "fr"])
    assert len(train_pairs) == 2 * len(train) and len(test_pairs) == 2 * len(test)
    assert not {src for _, src, _ in train_pairs} & {src for _, src, _ in test_pairs}  # no source seen
    with pytest.raises(ValueError, match="n_test"):
        s411.make_split(10, 10, seed=0)


@pytest.mark.parametrize(
    "n,english,german,french",
    [
        (21, "twenty-one", "einundzwanzig", "vingt et un"),  # German: units before tens
        (71, "seventy-one", "einundsiebzig", "soixante et onze"),  # French: 60 + 11
        (80, "eighty", "achtzig", "quatre-vingts"),  # 4 x 20, plural s
        (81, "eighty-one", "einundachtzig", "quatre-vingt-un"),  # ... and no s before a unit
        (200, "two hundred", "zweihundert", "deux cents"),
        (201, "two hundred and one", "zweihunderteins", "deux cent un"),
        (
            3412,
            "three thousand, four hundred and twelve",
            "dreitausendvierhundertzwölf",
            "trois mille quatre cent douze",
        ),
    ],
)
def test_parallel_corpus_is_real_german_and_french(n, english, german, french):
    assert s411.parallel_corpus([n], ["de", "fr"]) == [("de", english, german), ("fr", english, french)]


def test_batches_tag_the_target_language_and_shift_the_target():
    pairs = s411.parallel_corpus([21, 1234], ["de", "fr"])
    src_vocab = s411.CharVocab((s for _, s, _ in pairs), ("<de>", "<fr>"))
    tgt_vocab = s411.CharVocab(t for _, _, t in pairs)
    src, tgt_in, tgt_out = s411.encode_batch(pairs, src_vocab, tgt_vocab, "cpu")
    assert src[:, 0].tolist() == [src_vocab.tags[f"<{lang}>"] for lang, _, _ in pairs]
    assert src_vocab.decode(src[0].tolist()) == "twenty-one"  # the tag is no character
    for row, (_, _, target) in enumerate(pairs):
        n = len(target)
        assert tgt_in[row, 0] == s411.BOS and tgt_out[row, n] == s411.EOS
        assert torch.equal(tgt_in[row, 1 : n + 1], tgt_out[row, :n])  # teacher forcing: shifted by one
        assert tgt_vocab.decode(tgt_out[row].clamp(min=0).tolist()) == target
        assert (tgt_out[row, n + 1 :] == -100).all()


def test_scores_exact_match_bleu_chrf():
    refs = ["trois mille quatre cent douze", "deux cent vingt et un", "soixante et onze"]
    assert s411.scores(refs, refs) == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "chrf": 100.0})
    near = s411.scores(["trois mille quatre cent treize", "deux cent vingt et un", "soixante onze"], refs)
    assert near["exact_match"] == pytest.approx(1 / 3)
    assert 0 < near["bleu"] < 100 and 0 < near["chrf"] < 100
    # a German number is one word: no word 4-grams at all, so word BLEU is 0 even when every one is right
    german = ["einundzwanzig", "dreitausendvierhundertzwölf"]
    assert s411.scores(german, german)["bleu"] == 0.0
    assert s411.scores(german, german, s411.BLEU_TOKENIZE["de"])["bleu"] == pytest.approx(100.0)
    assert 0 < s411.scores(["einundzwanzig", "dreitausendvierhundertelf"], german, "char")["bleu"] < 100


# ----------------------------------------------------------------------------- the two recipes


def recipe_args(**overrides):
    defaults = dict(lr=4e-3, muon_lr=0.02, embedding_lr=0.02, head_lr=0.004, warmdown_frac=0.4)
    return argparse.Namespace(**{**defaults, **overrides})


BASE = DecoderConfig(vocab_size=96, context_length=32, n_layer=2, d_model=64, n_head=4, n_kv_head=4)


def test_nanodeepseek_architecture_is_switched_on():
    model = DecoderLM(s414.recipe_config("nanodeepseek", BASE))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.weight is None for m in norms)  # parameter-free RMSNorm everywhere
    for block in model.blocks:
        assert isinstance(block.ffn, MLP) and block.ffn.activation == "relu2"
        assert block.attn.q_norm is not None and block.attn.k_norm is not None  # QK-norm, weightless
    x = torch.randn(3, 8, 64)
    mlp = model.blocks[0].ffn
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))  # ReLU²

    llama = DecoderLM(s414.recipe_config("llama", BASE))
    assert all(isinstance(b.ffn, SwiGLU) and b.attn.q_norm is None for b in llama.blocks)
    norm_weights = sum(m.weight.numel() for m in llama.modules() if isinstance(m, RMSNorm))
    assert llama.num_params() - model.num_params() == norm_weights  # equal but for the norm weights


def test_nanodeepseek_optimizer_groups_and_rates():
    model = DecoderLM(s414.recipe_config("nanodeepseek", BASE))
    cfg = TrainConfig(**s414.recipe_optimizer("nanodeepseek", recipe_args(embedding_lr=0.05, head_lr=0.003)))
    assert cfg.use_muon and cfg.schedule == "linear" and cfg.warmdown_steps > 0
    opt = build_optimizer(
        model, cfg.lr, cfg.muon_lr, use_muon=cfg.use_muon, embedding_lr=cfg.embedding_lr, head_lr=cfg.head_lr
    )
    muon_params = opt.optimizers["muon"].param_groups[0]["params"]
    assert {id(p) for p in muon_params} == {id(p) for _, p in split_parameters(model)[0]}
    assert all(p.ndim == 2 for p in muon_params) and opt.optimizers["muon"].param_groups[0]["lr"] == 0.02
    groups = opt.optimizers["adamw"].param_groups
    by_param = {id(p): g["base_lr"] for g in groups for p in g["params"]}
    assert by_param == {id(model.tok_emb.weight): 0.05, id(model.lm_head.weight): 0.003}  # nothing else


def test_llama_recipe_is_adamw_with_cosine():
    model = DecoderLM(s414.recipe_config("llama", BASE))
    cfg = TrainConfig(**s414.recipe_optimizer("llama", recipe_args()))
    assert not cfg.use_muon and cfg.schedule == "cosine" and cfg.warmdown_steps == 0
    opt = build_optimizer(model, cfg.lr, use_muon=False, embedding_lr=cfg.embedding_lr, head_lr=cfg.head_lr)
    assert list(opt.optimizers) == ["adamw"]
    assert {g["lr"] for g in opt.param_groups} == {4e-3}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_separate_rates_with_tied_embeddings_and_bad_rates():
    model = DecoderLM(BASE.replace(tie_embeddings=True))
    opt = build_optimizer(model, embedding_lr=0.05, head_lr=0.007)
    adamw = opt.optimizers["adamw"].param_groups
    assert [g["lr"] for g in adamw if any(p is model.tok_emb.weight for p in g["params"])] == [0.05]
    assert all(g["lr"] != 0.007 for g in adamw)  # a tied head is the embedding
    with pytest.raises(ValueError, match="learning rates"):
        build_optimizer(nn.Linear(2, 2), head_lr=0.0)


# ----------------------------------------------------------------------------- resuming two recipes


def _train_lm(out, *flags):
    return s414.main(["--quick", "--out", str(out), "--samples", "0", "--eval-every", "0", *flags])


def test_resume_continues_a_recipe_starts_one_that_never_began_and_keeps_a_finished_one(tmp_path, capsys):
    from common.errors import UsageError

    with pytest.raises(UsageError, match="no checkpoint of any recipe"):
        _train_lm(tmp_path, "--resume")  # nothing saved: refused before anything trains
    assert "run:" not in capsys.readouterr().out
    # as if stopped during the first recipe: llama has a checkpoint, nanodeepseek none
    _train_lm(tmp_path, "--recipe", "llama", "--steps", "2")
    resumed = _train_lm(tmp_path, "--steps", "4", "--resume")
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and out.count("resumed from") == 1  # nanodeepseek started
    assert (tmp_path / "checkpoint-nanodeepseek").is_dir()
    # both finished: a second resume keeps them, retrains nothing, reports the same figures
    again = _train_lm(tmp_path, "--steps", "4", "--resume")
    assert capsys.readouterr().out.count("kept, not retrained") == 2
    for key in ("llama_val_loss", "nanodeepseek_val_loss", "nanodeepseek_train_seconds"):
        assert again[key] == resumed[key]
    with pytest.raises(UsageError, match="trained with lr="):  # other settings: refused up front
        _train_lm(tmp_path, "--steps", "6", "--resume", "--lr", "0.5")
