"""common.launch: real worker processes joined by gloo; a failing or hung worker never hangs the job."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from common.launch import WorkerError, WorkerTimeout, is_main, launched, run_workers


def _sum_of_ranks(ctx, scale):
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    return {
        "rank": ctx.rank,
        "world": ctx.world_size,
        "sum": scale * t.item(),
        "local": os.environ["LOCAL_SIZE"],
    }


def _rank1_raises(ctx):
    if ctx.rank == 1:
        raise ValueError("rank one cannot go on")
    dist.barrier()  # rank 0 waits here for a peer that never comes
    return ctx.rank


def _rank1_dies(ctx):
    if ctx.rank == 1:
        os._exit(3)
    dist.barrier()
    return ctx.rank


def _sleeps(ctx):
    time.sleep(60)


def test_results_in_rank_order_over_a_real_group():
    out = run_workers(_sum_of_ranks, nproc=2, args=(10.0,), timeout=120)
    # LOCAL_SIZE as DeepSpeed's launcher sets it (its CPU all-reduce kernel needs it)
    assert out == [{"rank": r, "world": 2, "sum": 30.0, "local": "2"} for r in range(2)]


def test_a_raising_worker_ends_the_others_and_names_its_rank():
    start = time.monotonic()
    with pytest.raises(WorkerError) as e:
        run_workers(_rank1_raises, nproc=2, timeout=120)
    assert e.value.rank == 1 and "rank one cannot go on" in str(e.value)
    assert time.monotonic() - start < 60  # not the barrier's or the job's timeout


def test_a_worker_that_dies_silently_is_reported_with_its_exit_code():
    with pytest.raises(WorkerError) as e:
        run_workers(_rank1_dies, nproc=2, timeout=120)
    assert e.value.rank == 1 and "exit code 3" in str(e.value)


def test_a_hung_job_ends_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(WorkerTimeout):
        run_workers(_sleeps, nproc=2, timeout=3)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("bad", [dict(nproc=0), dict(nproc=2, timeout=0)])
def test_bad_arguments_are_refused_before_any_process_starts(bad):
    with pytest.raises(ValueError):
        run_workers(_sum_of_ranks, args=(1.0,), **bad)


def test_plain_process_is_main_and_not_launched(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert is_main() and not launched()


def _returns_tensors(ctx):
    return {"rank": torch.full((3,), float(ctx.rank)), "big": torch.ones(1000, 100) * ctx.rank}


def test_tensor_results_survive_the_workers_exit():
    out = run_workers(_returns_tensors, nproc=2, timeout=120)
    assert [float(o["rank"][0]) for o in out] == [0.0, 1.0] and float(out[1]["big"].sum()) == 1e5


def test_show_each_warning_once_survives_filter_changes(monkeypatch):
    import warnings

    from common.launch import show_each_warning_once

    printed = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: printed.append(str(message)))
    show_each_warning_once()
    for _ in range(3):
        with warnings.catch_warnings():  # what DeepSpeed and torch do around their calls
            warnings.simplefilter("always")
            warnings.warn("deprecated collective", FutureWarning, stacklevel=1)
            warnings.warn("another one", UserWarning, stacklevel=1)
    assert printed == ["deprecated collective", "another one"]


def test_under_torchrun_deepspeed_gets_its_local_size(monkeypatch):
    from common.launch import _deepspeed_env

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    _deepspeed_env()
    assert os.environ["LOCAL_SIZE"] == "4"
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's own launcher set it: left alone
    _deepspeed_env()
    assert os.environ["LOCAL_SIZE"] == "2"


def _deepspeed_all_reduce(ctx):
    import deepspeed
    import deepspeed.comm as ds_dist

    from common.launch import deepspeed_shm_files

    deepspeed.init_distributed(dist_backend="gloo")
    t = torch.ones(4)
    ds_dist.all_reduce(t)
    port = os.environ["MASTER_PORT"]
    return port, [p.name for p in deepspeed_shm_files("127.0.0.1", port)], t.tolist()


def _deepspeed_then_raise(ctx):
    _deepspeed_all_reduce(ctx)
    if ctx.rank == 1:
        raise ValueError("rank one fails after DeepSpeed set up its buffers")
    dist.barrier()


def test_deepspeeds_shared_memory_buffers_are_removed_when_the_job_ends():
    pytest.importorskip(
        "deepspeed", reason="DeepSpeed is in requirements.txt; this checks its CPU all-reduce"
    )
    from common.launch import deepspeed_shm_files

    out = run_workers(_deepspeed_all_reduce, nproc=2, timeout=300)
    port, seen, total = out[0]
    assert total == [2.0] * 4
    # the shared-memory kernel made one buffer per rank (so this test sees the leak it guards against)
    assert len(seen) == 2 and all(name.endswith(("_0", "_1")) for name in seen)
    assert deepspeed_shm_files("127.0.0.1", port) == []
    before = {p.name for p in deepspeed_shm_files("127.0.0.1", "*")}
    with pytest.raises(WorkerError, match="rank one fails"):
        run_workers(_deepspeed_then_raise, nproc=2, timeout=300)
    assert {p.name for p in deepspeed_shm_files("127.0.0.1", "*")} == before
