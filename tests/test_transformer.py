"""The encoder-decoder Transformer against torch.nn.Transformer (Post-LN and Pre-LN), weights copied
across, with source/target/memory padding masks; plus the token-level model's checks. fp32, 1e-5."""

import pytest
import torch
from torch import nn

from common.models.transformer import Seq2SeqTransformer, Transformer

ATOL = 1e-5
D, H, FF = 32, 4, 64


def _copy_attn(ours, ref: nn.MultiheadAttention):
    wq, wk, wv = ref.in_proj_weight.chunk(3)
    bq, bk, bv = ref.in_proj_bias.chunk(3)
    for lin, w, b in (
        (ours.q_proj, wq, bq),
        (ours.k_proj, wk, bk),
        (ours.v_proj, wv, bv),
        (ours.out_proj, ref.out_proj.weight, ref.out_proj.bias),
    ):
        lin.weight.copy_(w)
        lin.bias.copy_(b)


def _copy_ffn_and_norms(ours, ref, n_norms):
    ours.ffn.linear1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.linear2.load_state_dict(ref.linear2.state_dict())
    for i in range(1, n_norms + 1):
        getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())


def _reference(norm_first: bool) -> nn.Transformer:
    """torch's Transformer; Post-LN stacks get no extra final LayerNorm (the paper has none)."""
    enc_layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    dec_layer = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(
        enc_layer, 2, norm=nn.LayerNorm(D) if norm_first else None, enable_nested_tensor=False
    )
    decoder = nn.TransformerDecoder(dec_layer, 2, norm=nn.LayerNorm(D) if norm_first else None)
    return nn.Transformer(D, H, custom_encoder=encoder, custom_decoder=decoder, batch_first=True)


def _copied(ref: nn.Transformer, norm_first: bool) -> Transformer:
    ours = Transformer(D, H, 2, 2, FF, dropout=0.0, norm_first=norm_first)
    with torch.no_grad():
        for o, r in zip(ours.encoder_layers, ref.encoder.layers):
            _copy_attn(o.self_attn, r.self_attn)
            _copy_ffn_and_norms(o, r, 2)
        for o, r in zip(ours.decoder_layers, ref.decoder.layers):
            _copy_attn(o.self_attn, r.self_attn)
            _copy_attn(o.cross_attn, r.multihead_attn)
            _copy_ffn_and_norms(o, r, 3)
        if norm_first:
            ours.encoder_norm.load_state_dict(ref.encoder.norm.state_dict())
            ours.decoder_norm.load_state_dict(ref.decoder.norm.state_dict())
    return ours


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer_matches_torch(norm_first):
    torch.manual_seed(0)
    ref = _reference(norm_first)
    for p in ref.parameters():  # LayerNorm weights away from 1 so that a wrong copy would show
        nn.init.normal_(p, std=0.3)
    ours = _copied(ref, norm_first)
    src, tgt = torch.randn(3, 9, D), torch.randn(3, 6, D)
    src_pad = torch.zeros(3, 9, dtype=torch.bool)
    src_pad[1, 6:] = True
    src_pad[2, 4:] = True
    tgt_pad = torch.zeros(3, 6, dtype=torch.bool)
    tgt_pad[2, 5:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch's convention: True = may NOT attend
    expected = ref(
        src,
        tgt,
        tgt_mask=causal,
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    got = ours(
        src, tgt, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad
    )
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # and the gradients: training our model is training torch's
    expected.square().mean().backward()
    got.square().mean().backward()
    torch.testing.assert_close(
        ours.encoder_layers[0].self_attn.q_proj.weight.grad,
        ref.encoder.layers[0].self_attn.in_proj_weight.grad.chunk(3)[0],
        atol=1e-5,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        ours.decoder_layers[1].ffn.linear1.weight.grad,
        ref.decoder.layers[1].linear1.weight.grad,
        atol=1e-5,
        rtol=1e-4,
    )


def test_post_ln_has_no_final_norm_and_pre_ln_has_one():
    assert Transformer(D, H, 1, 1, FF, norm_first=False).encoder_norm is None
    assert isinstance(Transformer(D, H, 1, 1, FF, norm_first=True).decoder_norm, nn.LayerNorm)


def test_seq2seq_decoder_is_causal_and_ignores_source_padding():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        12, 10, d_model=D, n_head=H, num_encoder_layers=1, num_decoder_layers=1, d_ff=FF, dropout=0.0
    ).eval()
    src = torch.tensor([[3, 4, 5, 0, 0]])
    tgt = torch.tensor([[1, 6, 7, 8]])
    logits = model(src, tgt)
    assert logits.shape == (1, 4, 10)
    # changing a later target token leaves earlier positions untouched
    tgt2 = tgt.clone()
    tgt2[0, 3] = 9
    torch.testing.assert_close(model(src, tgt2)[:, :3], logits[:, :3], atol=ATOL, rtol=0)
    # more padding on the source changes nothing
    torch.testing.assert_close(model(torch.tensor([[3, 4, 5, 0, 0, 0, 0]]), tgt), logits, atol=ATOL, rtol=0)


def test_greedy_decode_stops_at_eos_and_pads_after():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        12, 10, d_model=D, n_head=H, num_encoder_layers=1, num_decoder_layers=1, d_ff=FF, dropout=0.0
    ).eval()
    with torch.no_grad():  # make EOS (2) the argmax everywhere
        model.generator.bias[2] = 100.0
    out = model.greedy_decode(torch.tensor([[3, 4], [5, 6]]), bos_id=1, eos_id=2, max_len=5)
    assert out.tolist() == [[2], [2]]


def test_seq2seq_rejects_bad_input():
    model = Seq2SeqTransformer(
        12, 10, d_model=D, n_head=H, num_encoder_layers=1, num_decoder_layers=1, d_ff=FF, max_len=8
    )
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[3, 12]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="longer than"):
        model(torch.ones(1, 9, dtype=torch.long), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="divide d_model"):
        Seq2SeqTransformer(12, 10, d_model=30, n_head=4)
