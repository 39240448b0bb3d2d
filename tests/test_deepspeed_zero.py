"""DeepSpeed ZeRO stages 0, 1 and 2 over two processes follow plain PyTorch DDP's loss, and each rank
holds the optimizer bytes the ZeRO paper's formula gives.  Whether DeepSpeed accepts fp16 and bf16
depends on the machine (its CPU accelerator asks oneDNN: ``_is_mkldnn_fp16_supported``, true on
Sapphire Rapids, false on most CPUs), so both answers are forced in the workers and both of
``s4_3_2_deepspeed``'s branches run here, whichever this machine takes."""

import functools

import pytest

from common.launch import run_workers

pytest.importorskip("deepspeed")


def _forced_worker(fp16: bool, bf16: bool, ctx, *args):
    """s4_3_2's worker with DeepSpeed's accelerator answering ``fp16``/``bf16`` supported or not."""
    from deepspeed.accelerator import get_accelerator

    from ch04_transformer_moe.s4_3_2_deepspeed import worker

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: fp16
    accelerator.is_bf16_supported = lambda: bf16
    return worker(ctx, *args)


@pytest.mark.slow
def test_zero_stages_equal_ddp():
    from ch04_transformer_moe.s4_3_2_deepspeed import formula, worker

    runs = [("ddp", 0, "fp32"), ("zero", 0, "fp32"), ("zero", 1, "fp32"), ("zero", 2, "fp32")]
    results = run_workers(worker, 2, args=(runs, 3, 4, 0, 16), timeout=600)
    ddp = results[0]["ddp-0-fp32"]
    params = ddp["params"]
    for stage in (0, 1, 2):
        for rank in (0, 1):
            run = results[rank][f"zero-{stage}-fp32"]
            assert run["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
            assert run["moments"] + run["master"] == formula(stage, params, 2, mixed=False)
    assert ddp["losses"][-1] < ddp["losses"][0]  # it trains


@pytest.mark.parametrize("supported", [True, False], ids=["fp16-accepted", "fp16-refused"])
def test_half_precision_both_ways(supported):
    """Accepted, fp16 and bf16 ZeRO-1 train (the module's buffers cast with it, the loss near fp32's,
    12Ψ/N bytes per rank); refused, each run records DeepSpeed's own message."""
    from ch04_transformer_moe.s4_3_2_deepspeed import formula

    runs = [("ddp", 0, "fp32"), ("zero", 1, "fp16"), ("zero", 1, "bf16")]
    forced = functools.partial(_forced_worker, supported, supported)
    results = run_workers(forced, 2, args=(runs, 3, 4, 0, 16), timeout=600)
    ddp = results[0]["ddp-0-fp32"]
    for rank in (0, 1):
        for dtype in ("fp16", "bf16"):
            run = results[rank][f"zero-1-{dtype}"]
            if not supported:
                assert run["refused"].startswith(f"Type {dtype} is not supported")  # wording: by version
                continue
            assert run["losses"] == pytest.approx(ddp["losses"], abs=0.05)
            assert run["moments"] + run["master"] == formula(1, ddp["params"], 2, mixed=True)
        if supported:
            assert results[rank]["zero-1-fp16"]["skipped"] == 0  # tiny gradients: no overflow at 2^16


@pytest.mark.slow
@pytest.mark.parametrize("supported", [True, False], ids=["fp16-accepted", "fp16-refused"])
def test_script_reports_fp16_both_ways(monkeypatch, tmp_path, supported):
    """The script's account of fp16: the run's figures where DeepSpeed accepts it, its reason where not."""
    import ch04_transformer_moe.s4_3_2_deepspeed as script

    monkeypatch.setattr(script, "worker", functools.partial(_forced_worker, supported, True))
    figures = script.main(["--quick", "--steps", "2", "--out", str(tmp_path / "out")])
    if supported:
        assert figures["fp16"] == "ran"
        assert figures["fp16_zero1_rank0_opt_bytes"] == figures["bf16_zero1_rank0_opt_bytes"]
        assert figures["fp16_final_loss"] == pytest.approx(figures["ddp_final_loss"], abs=0.05)
    else:
        assert figures["fp16"].startswith("refused: Type fp16 is not supported")
        assert "fp16_final_loss" not in figures
