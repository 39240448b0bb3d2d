"""s4_3_3_low_rank: the truncated SVD at full rank is the original, LoRA merged equals unmerged, and our
LoRA equals peft's LoRA on the same model converted to transformers' Llama with the same adapters."""

import pytest
import torch

from ch04_transformer_moe.s4_3_3_low_rank import (
    ADAPT_MODULES,
    LowRankLinear,
    adaptation_data,
    add_lora,
    factorized,
    merge_lora,
    peft_twin,
)
from common.data import STDLIB_MODULES, TokenData, load_corpus, module_docstrings
from common.models.decoder import DecoderConfig, DecoderLM


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=101, context_length=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2)
    return DecoderLM(DecoderConfig(**{**cfg, **kw})).eval()


def randomize_adapters(lora):
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)


def test_full_rank_svd_is_the_original_and_low_rank_is_smaller():
    model = tiny()
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        full = factorized(model, 32)(x)[0]
        assert (full - model(x)[0]).abs().max() < 1e-4
        low = factorized(model, 4)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="rank 33 is outside"):
        LowRankLinear(torch.nn.Linear(32, 64), 33)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=4, bias=True)])
def test_lora_merged_and_peft_equal_ours(kw):
    model = tiny(**kw)
    lora = add_lora(model, 4, 8.0)
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        assert torch.equal(lora(x)[0], model(x)[0])  # B starts at zero
    randomize_adapters(lora)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        ours = lora(x)[0]
        assert (ours - model(x)[0]).abs().max() > 1e-2  # the adapters do something
        assert (merge_lora(lora)(x)[0] - ours).abs().max() < 1e-5
        twin = peft_twin(model, lora, 4, 8.0)
        assert (twin(input_ids=x).logits - ours).abs().max() < 1e-5


def test_lora_adaptation_domain_is_outside_the_corpus():
    """LoRA adapts on text the base model never trained on, split into two sets of documents."""
    assert set(ADAPT_MODULES).isdisjoint(STDLIB_MODULES)
    corpus = load_corpus()
    first_docs = [module_docstrings(m).split("\n\n")[0] for m in ADAPT_MODULES[:4]]
    assert all(doc and doc not in corpus for doc in first_docs)

    class Source:  # bytes as tokens: enough to check the split
        eot_id = 0
        data = TokenData(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 8, None, 256)

        def encode(self, text):
            return list(text.encode("utf-8"))

    data = adaptation_data(Source())
    assert len(data.train) > 2 * len(data.val) > 10_000
