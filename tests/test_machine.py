"""common.machine: the peak-memory measurement sees what a workload allocates; the rates are sane."""

import pytest
import torch

from common import machine


def _size(mbytes: int) -> int:
    return mbytes


def _allocate(mbytes: int) -> float:
    t = torch.ones(mbytes * 2**20 // 4)  # written: every page becomes resident
    return t.sum().item()


def _raise(_):
    raise KeyError("boom")


def test_peak_memory_sees_an_allocation():
    """One fresh process (each costs an interpreter and a torch import): 128 MiB written by ``work``
    after an empty ``setup`` shows as a peak 128 MiB above the setup."""
    out = machine.peak_memory(_size, _allocate, 128)
    grown = (out["peak_bytes"] - out["setup_bytes"]) / 2**20
    assert grown == pytest.approx(128, rel=0.1)  # ~3.5 MiB above: the sum and first-touch of torch ops
    assert out["result"] == 128 * 2**20 // 4
    assert out["seconds"] > 0


def test_peak_memory_reports_the_childs_error():
    with pytest.raises(RuntimeError, match="KeyError"):
        machine.peak_memory(_size, _raise, 1)


def test_rates_are_positive():
    assert machine.matmul_flops(64, repeats=1) > 0
    assert machine.memory_bandwidth(8, repeats=1) > 0
    assert machine.matvec_bandwidth([torch.randn(256, 128), torch.randn(64, 256)], repeats=1) > 0
    hw = machine.measure_machine(quick=True)
    assert hw.fp32_tflops > 0 and hw.bandwidth_gbs > 0 and hw.memory_gb > 0
