"""Benchmark history: machine ids, the per-machine JSON-lines file, regression detection."""

from __future__ import annotations

import copy
import json

import pytest

from edge_build import history
from edge_build.errors import EdgeBuildError


def _record(target: str = "lite", **p50: float) -> dict:
    """A history record with one batch-1 row per keyword (artifact name -> p50 ms)."""
    record = history.new_record(
        target,
        "abc123",
        {name: {"sha256": f"sha-{name}", "size": 1, "runtime": "onnxruntime", "role": "artifact"} for name in p50},
        {
            name: {"1": {"p50_ms": value, "spread_ms": 0.01, "p90_ms": value, "mean_ms": value, "runs": 50}}
            for name, value in p50.items()
        },
    )
    return record


def test_machine_id_is_readable_stable_and_changes_with_runtime_versions():
    description = history.machine()
    key = history.machine_id(description)
    assert key == history.machine_id(description)
    assert f"-{description['cores']}c-" in key
    assert all(ch.isalnum() or ch == "-" for ch in key)
    assert "onnxruntime" in description["runtimes"]
    other = copy.deepcopy(description)
    other["runtimes"]["onnxruntime"] = "0.0.1"
    assert history.machine_id(other) != key
    assert history.machine_id(other).rsplit("-", 1)[0] == key.rsplit("-", 1)[0]  # same readable prefix


def test_append_keeps_every_record_and_previous_is_per_target(tmp_path):
    first, other, second = _record("lite", a=1.0), _record("cpu", a=9.0), _record("lite", a=2.0)
    for record in (first, other, second):
        path = history.append_record(tmp_path, record)
    assert path.name == f"{first['machine_id']}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(json.loads(line)["schema"] == history.SCHEMA for line in lines)
    assert history.previous_record(tmp_path, first["machine_id"], "lite")["latency"]["a"]["1"]["p50_ms"] == 2.0
    assert history.previous_record(tmp_path, first["machine_id"], "cpu")["latency"]["a"]["1"]["p50_ms"] == 9.0
    assert history.previous_record(tmp_path, first["machine_id"], "gpu") is None
    assert history.previous_record(tmp_path, "another-machine", "lite") is None
    assert {"git_commit", "date", "target", "artifacts", "machine"} <= set(json.loads(lines[0]))


def test_corrupt_history_line_names_file_and_line(tmp_path):
    record = _record(a=1.0)
    path = history.append_record(tmp_path, record)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(EdgeBuildError, match=r"\.jsonl:2: not a JSON record"):
        history.previous_record(tmp_path, record["machine_id"], "lite")


def test_planted_slowdown_in_an_edited_history_record_is_caught():
    now = _record(fast=1.00, slow=1.00)
    before = copy.deepcopy(now)
    before["latency"]["slow"]["1"]["p50_ms"] = 0.50  # the previous run was twice as fast
    changes = {c.artifact: c for c in history.compare(before, now)}
    assert changes["slow"].change_pct == pytest.approx(100.0)
    assert [c.artifact for c in history.regressions(list(changes.values()), 10)] == ["slow"]


def test_small_changes_and_changes_within_the_spread_are_not_regressions():
    before = _record(a=1.00)
    now = _record(a=1.05)
    assert history.regressions(history.compare(before, now), 10) == []  # 5 % < 10 %
    now = _record(a=1.15)
    assert [c.artifact for c in history.regressions(history.compare(before, now), 10)] == ["a"]
    noisy = copy.deepcopy(now)
    noisy["latency"]["a"]["1"]["spread_ms"] = 0.05  # 1.15 <= 1.0 * 1.1 + 0.05 + 0.01
    assert history.regressions(history.compare(before, noisy), 10) == []


def _with_reference(record: dict, p50: float, sha: str = "litert-sha") -> dict:
    record = copy.deepcopy(record)
    record["artifacts"]["litert"] = {"sha256": sha, "size": 1, "runtime": "litert", "role": "reference"}
    record["latency"]["litert"] = {"1": {"p50_ms": p50, "spread_ms": 0.0, "p90_ms": p50, "mean_ms": p50, "runs": 50}}
    return record


def test_machine_drift_seen_by_the_unchanged_reference_is_not_blamed_on_the_artifact():
    before = _with_reference(_record(a=1.0), 1.0)
    busy = _with_reference(_record(a=1.5), 1.5)  # everything 50 % slower: the machine
    changes = history.compare(before, busy)
    assert {c.artifact: c.machine for c in changes} == {"a": 1.5, "litert": 1.5}
    assert history.regressions(changes, 10) == []
    worse = _with_reference(_record(a=2.0), 1.5)  # the artifact 33 % worse than the machine's drift
    assert [c.artifact for c in history.regressions(history.compare(before, worse), 10)] == ["a"]
    # A reference whose file changed is no yardstick; a faster machine never makes the rule stricter.
    swapped = _with_reference(_record(a=1.5), 1.5, sha="other")
    assert [c.artifact for c in history.regressions(history.compare(before, swapped), 10)] == ["a"]
    faster = _with_reference(_record(a=1.05), 0.5)
    assert history.regressions(history.compare(before, faster), 10) == []


def test_reference_rows_are_reported_but_never_fail_the_gate():
    before = _with_reference(_record(a=1.0), 1.0, sha="v1")
    now = _with_reference(_record(a=1.0), 3.0, sha="v2")
    changes = history.compare(before, now)
    assert any(c.artifact == "litert" and c.change_pct == pytest.approx(200.0) for c in changes)
    assert history.regressions(changes, 10) == []
