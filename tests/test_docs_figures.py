"""The learning-curve script of docs/results.md reads every evaluation it names from docs/logs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "gated_curve.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gated_curve", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_named_evaluation_is_found_in_its_log() -> None:
    curve = _load()
    rates = curve.segment_rates()
    expected = 0
    for segment, _, log, label in curve.EVALS:
        path = curve.LOGS / log
        if segment not in rates or not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        expected += any(
            r.get("checkpoint") == label and r.get("prompts", "test[0:6]") == "test[6:30]"
            for r in rows
        )
    found = curve.points("test[6:30]")
    assert len(found) == expected >= 10
    targets = [p[1] for p in found]
    assert targets == sorted(targets), "cumulative targets must grow along the runs"
    assert all(1.0 < p[2] < p[3] < 3.0 for p in found), "ConfAdapt below verify, both > 1"


def test_fit_recovers_a_log_linear_curve() -> None:
    curve = _load()
    xs = [1e5 * 2**i for i in range(6)]
    ys = [1.1 + 0.05 * i for i in range(6)]
    a, b = curve.fit(xs, ys)
    assert np.isclose(b, 0.05) and np.isclose(a + b * np.log2(1e5), 1.1)


def test_every_branch_is_found_and_starts_where_its_parent_ends() -> None:
    curve = _load()
    main_line = {label.split(" step ")[0]: x for label, x, _, _ in curve.points("test[6:30]")}
    found = curve.branch_points("test[6:30]")
    assert [b[0] for b in found] == [b[0] for b in curve.BRANCHES]
    assert len(curve.branch_points("test[0:90]")) == len(found)
    for (name, x, confadapt, verify), branch in zip(found, curve.BRANCHES, strict=True):
        parent = branch[4]
        assert x > main_line[parent], f"{name} must lie past the end of {parent}"
        assert 1.0 < confadapt < verify < 3.0
