"""Chapter 6's scripts refuse bad configurations before any worker starts (a one-line argparse error,
exit 2), and the expert-parallel benchmark's quick mode runs end to end and records its settings.
(The scripts' quick runs themselves are in tests/test_scripts.py.)"""

import json
import time

import pytest
import torch

from benchmarks import bench_ep
from ch06_distributed_moe import (
    s6_4_1_fastmoe_core,
    s6_4_2_deepspeed_moe_core,
    s6_4_3_fastmoe_transformer,
    s6_4_4_deepspeed_training,
    s6_5_all_to_all_cost,
)


@pytest.mark.parametrize(
    "main,argv,message",
    [
        (s6_4_1_fastmoe_core.main, ["--experts", "2", "--top-k", "3"], "--top-k"),
        (s6_4_2_deepspeed_moe_core.main, ["--experts", "3", "--nproc", "2"], "ep_size 2"),
        (s6_4_3_fastmoe_transformer.main, ["--experts", "3", "--nproc", "2"], "must divide by 2 workers"),
        (s6_4_3_fastmoe_transformer.main, ["--d-model", "30", "--heads", "4"], "--heads"),
        (s6_4_4_deepspeed_training.main, ["--experts", "5"], "must divide by 2 processes"),
        (s6_5_all_to_all_cost.main, ["--experts", "8", "--top-k", "9"], "--top-k 9"),
        (s6_5_all_to_all_cost.main, ["--experts", "6", "--nproc", "4"], "--experts 6"),
    ],
)
def test_bad_configuration_is_refused_at_once(main, argv, message, capsys):
    start = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert time.monotonic() - start < 10  # before any worker process or DeepSpeed import


def test_bench_ep_quick_records_both_ratios_and_every_setting(tmp_path):
    out = tmp_path / "bench_ep.json"
    bench_ep.main(["--quick", "--repeats", "2", "--warmup", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    (r,) = saved["results"]
    assert set(r["ep_seconds"]) == {"ours", bench_ep.CAPPED, "DeepSpeed"} and set(
        r["one_process_seconds"]
    ) == {
        "ours",
        "floor",
    }
    assert all(
        len(v) == 2 and min(v) > 0 for v in [*r["ep_seconds"].values(), *r["one_process_seconds"].values()]
    )
    assert r["ep_x_deepspeed"] > 0 and r["ep_naive_x_deepspeed"] > 0 and r["x_floor"] > 0
    assert (
        saved["settings"]["DeepSpeed"]["ep_size"] == 2
        and saved["settings"]["DeepSpeed"]["capacity_factor"] == 1.0
    )
    # the chapter README's speed block is built from this JSON alone
    from benchmarks import speed_section

    block = speed_section.ep_block(saved)
    assert bench_ep.table(saved["results"]) in block and saved["format"] == bench_ep.FORMAT


@pytest.mark.parametrize("tokens, experts", [(4096, 16), (2048, 8), (1000, 6)])
def test_bench_ep_capacity_gate_gives_deepspeeds_slots_per_expert(tokens, experts):
    """The goal's contender keeps as many slots per expert as DeepSpeed's top-2 gating at its default
    factor: DeepSpeed's own capacity function against ours on the same token count."""
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")
    c = bench_ep.Config("t", tokens, 64, experts, 128, 2)
    gate = bench_ep.capacity_gate(c)(64, experts, 1)
    factor = bench_ep.DEEPSPEED_SETTINGS["capacity_factor"]
    theirs = sharded_moe._capacity(
        torch.zeros(tokens, experts),
        torch.tensor(2 * factor),
        torch.tensor(bench_ep.DEEPSPEED_SETTINGS["min_capacity"]),
    )
    assert gate.train().slots_per_expert(tokens) == int(theirs) and gate.random_routing is False
