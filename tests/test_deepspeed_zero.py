"""DeepSpeed ZeRO stages 0, 1 and 2 over two processes follow plain PyTorch DDP's loss, and each rank
holds the optimizer bytes the ZeRO paper's formula gives."""

import pytest

from common.launch import run_workers

pytest.importorskip("deepspeed")


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
