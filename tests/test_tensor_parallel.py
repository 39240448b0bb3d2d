"""Tensor parallelism (``ch07_deployment/s7_3_3_multi_gpu_13b``): the Megatron split over two processes gives
one process's greedy tokens and logits, and so do DeepSpeed's AutoTP and PyTorch's ``parallelize_module``;
bad input is a one-line error; the per-GPU plan of Llama-2-13B matches the figures counted by hand from its
published config."""

import importlib.util

import pytest
import torch

from ch07_deployment.s7_3_3_multi_gpu_13b import main, print_plan, tp_worker
from common import estimate
from common.launch import run_workers
from common.models.decoder import DecoderConfig, DecoderLM
from common.models.generation import generate

PROMPT = [3, 14, 15, 9, 26, 5]
NEW = 6


def decisive_model(**overrides) -> DecoderLM:
    """A small random DecoderLM with weights large enough that greedy choices are not near-ties."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=96, context_length=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48)
    config = DecoderConfig(**(sizes | overrides))
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def run_split(model: DecoderLM, anchor: str) -> tuple[list[dict], list[int], torch.Tensor]:
    single_tokens = generate(model, [PROMPT], NEW)[0]
    with torch.no_grad():
        single_logits = model(torch.tensor([PROMPT]))[0]
    results = run_workers(
        tp_worker, 2, args=(model.config, model.state_dict(), PROMPT, NEW, 1, anchor), timeout=300
    )
    return results, single_tokens, single_logits


def test_split_and_libraries_tokens_equal_one_process():
    libraries = ("deepspeed", "torch") if importlib.util.find_spec("deepspeed") else ("torch",)
    model = decisive_model()
    results, single_tokens, single_logits = run_split(model, "all" if len(libraries) == 2 else "torch")
    assert len(set(single_tokens)) > 1  # a continuation that could go wrong
    for r in results:
        assert r["tokens"] == single_tokens
        assert (r["logits"] - single_logits).abs().max().item() < 1e-4
        assert r["anchor"]["skipped"] == {}
        assert r["anchor"]["single_tokens"] == single_tokens  # transformers' Llama in one process: ours
        for library in libraries:
            assert r["anchor"]["ran"][library]["tokens"] == single_tokens
            assert r["anchor"]["ran"][library]["logits_diff"] < 1e-4


def test_split_of_gelu_mlp_biases_qk_norm_tied_head():
    model = decisive_model(ffn="gelu", bias=True, qk_norm=True, tie_embeddings=True, d_ff=64)
    results, single_tokens, single_logits = run_split(model, "none")
    for r in results:
        assert r["tokens"] == single_tokens
        assert (r["logits"] - single_logits).abs().max().item() < 1e-4


def test_bad_input_is_a_one_line_error(capsys):
    for argv, message in [
        (["--nproc", "0"], "--nproc: the value must be from 1 to 256, got 0"),
        (["--quick", "--nproc", "3"], "40 attention heads do not divide over 3"),
        (["--quick", "--nproc", "4", "--preset", "llama-2-70b"], "2 attention heads do not divide over 4"),
        (["--model", "test", "--new-tokens", "100"], "new tokens exceed the context of 64"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="2 key/value heads do not divide over 4"):
        estimate.check_tensor_parallel(DecoderConfig(d_model=32, n_head=4, n_kv_head=2), 4)
    with pytest.raises(ValueError, match="dense MHA/GQA"):
        estimate.tensor_parallel_weight_bytes("mixtral-8x7b", 2)
    with pytest.raises(ValueError, match="rank's 6912 input features of down"):
        estimate.tensor_parallel_weight_bytes("llama-2-13b", 2, bits=4, group_size=512)


def test_13b_plan_by_hand():
    # Llama-2-13B's config.json: hidden 5120, intermediate 13824, 40 layers, 40 heads (no GQA), vocab 32000
    d, ff, layers, vocab, heads, head_dim = 5120, 13824, 40, 32000, 40, 128
    matrices = layers * (4 * d * d + 3 * d * ff)  # q, k, v, o and gate, up, down
    split = matrices + vocab * d  # the layers' matrices and the output head
    whole = vocab * d + 2 * layers * d + d  # embedding, two norms per layer, the final norm
    assert split + whole == estimate.count_params("llama-2-13b")["total"]

    fp16 = (split // 2 + whole) * 2
    int8 = ((matrices * 8 + matrices // 128 * (16 + 8)) // 8 + vocab * d * 2) // 2 + whole * 2
    int4 = ((matrices * 4 + matrices // 128 * (16 + 4)) // 8 + vocab * d * 2) // 2 + whole * 2
    kv_per_gpu = 2 * layers * (heads // 2) * head_dim * 2  # keys and values of 20 heads, fp16
    memory_4060 = 8 * 2**30  # the card's 8 GiB of GDDR6 (its datasheet's "8 GB" is binary)

    figures = print_plan("llama-2-13b", 2)
    assert figures["fp16_gb_per_gpu"] * 1e9 == pytest.approx(fp16, abs=1)
    assert figures["int8_gb_per_gpu"] * 1e9 == pytest.approx(int8, abs=1)
    assert figures["int4_gb_per_gpu"] * 1e9 == pytest.approx(int4, abs=1)
    assert figures["fp16_gb_one_gpu"] * 1e9 == pytest.approx((split + whole) * 2, abs=1)
    assert figures["kv_bytes_per_token_per_gpu"] == kv_per_gpu
    assert figures["allreduce_bytes_per_token"] == (2 * layers * d + vocab) * 2
    assert figures["allreduces_per_token"] == 2 * layers + 1
    assert figures["fp16_fits_book_gpus"] is (fp16 < memory_4060)  # 13.2 GB on an 8 GB card: no
    assert figures["int8_kv_tokens_book_gpus"] == int((memory_4060 - int8) // kv_per_gpu)
    a100_80gb = 2039e9  # bytes/s, the datasheet's bandwidth
    assert figures["fp16_read_ms_per_gpu"] == pytest.approx(fp16 / a100_80gb * 1e3)
    assert figures["fp16_read_ms_one_gpu"] == pytest.approx((split + whole) * 2 / a100_80gb * 1e3)


def test_one_gpu_plan_is_the_whole_model():
    for preset in ("llama-2-70b", "mixtral-8x7b"):
        rows = estimate.deployment_plan(preset, gpus=["h200"])
        for (bits, group, _), row in zip(estimate.DEPLOY_PRECISIONS, rows):
            assert row["weights_gb"] * 1e9 == estimate.weight_bytes(preset, bits, group)
