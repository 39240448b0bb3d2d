"""The tested version range: requirements-floor.txt's pins and newest-tested notes, the warnings outside
that range, and requirements.txt's lower bounds, which must be the floor that was run."""

import re

from common import tested_versions
from common.tested_versions import FLOOR_FILE, range_warnings
from tests.conftest import REPO_ROOT


def _padded(version: str) -> tuple[int, ...]:
    """'1.26' -> (1, 26, 0)."""
    parts = tuple(int(x) for x in version.split("."))
    return parts + (0,) * (3 - len(parts))


def test_the_floor_file_names_both_ends_for_every_dependency():
    ranges = tested_versions.tested_ranges()
    assert {"torch", "numpy", "transformers", "deepspeed", "onnxruntime", "peft"} <= set(ranges)
    assert all(high is not None for _, high in ranges.values())


def test_requirements_lower_bounds_are_the_tested_floor():
    bounds = dict(
        re.findall(r"^([A-Za-z0-9_.\-]+)>=([^\s#]+)", (REPO_ROOT / "requirements.txt").read_text(), re.M)
    )
    for name, (low, _) in tested_versions.tested_ranges().items():
        if name == "torch":  # declared >= 2.3, run only at 2.13.0 (the floor file says so)
            continue
        assert name in bounds, f"{name} is in {FLOOR_FILE.name} but not in requirements.txt"
        assert _padded(bounds[name]) == _padded(low), f"requirements.txt {name}>={bounds[name]}, floor {low}"


def test_warnings_below_the_floor_and_above_the_newest(tmp_path):
    floor = tmp_path / "floor.txt"
    floor.write_text(
        "# a comment\nnumpy==1.26.0  # newest tested: 2.4.6\nonnx==1.17.0\n"
        "absent==1.0  # newest tested: 2.0\n"
    )
    assert tested_versions.tested_ranges(floor) == {
        "numpy": ("1.26.0", "2.4.6"),
        "onnx": ("1.17.0", None),
        "absent": ("1.0", "2.0"),
    }
    versions = {"numpy": "1.25.2", "onnx": "9.0"}
    (low,) = range_warnings(
        versions.get, floor
    )  # onnx has no newest: no upper warning; absent: not installed
    assert "numpy 1.25.2 is older than the oldest version tested, 1.26.0" in low and "2.4.6" in low
    versions = {"numpy": "2.5.0+local", "onnx": "1.17.0"}
    (high,) = range_warnings(versions.get, floor)
    assert "numpy 2.5.0+local is newer than the newest version tested, 2.4.6" in high
    assert range_warnings({"numpy": "2.4.6", "onnx": "1.17.0"}.get, floor) == []
    assert range_warnings(versions.get, tmp_path / "missing.txt") == []


def test_the_environment_report_carries_them(monkeypatch):
    from common import env

    monkeypatch.setattr(env, "range_warnings", lambda: ["numpy 1.0 is older than the oldest version tested"])
    assert "numpy 1.0 is older than the oldest version tested" in env.environment_report()["warnings"]
