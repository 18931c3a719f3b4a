"""`edge-build all` end to end on the shared data: bundle, caching, check-bundle, failure safety."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_build import stages
from edge_build.cli import main
from edge_build.config import load_settings

pytestmark = pytest.mark.slow

SETTINGS = load_settings()
DATA, WEIGHTS, TARGETS = SETTINGS.data.path, SETTINGS.weights.path, SETTINGS["targets"].path


def _all(build: Path, dist: Path, *extra: str, targets: Path = TARGETS):
    args = ["all", "--no-bench", "--data", str(DATA), "--weights", str(WEIGHTS), "--build", str(build)]
    args += ["--out", str(dist), "--targets", str(targets), *extra]
    before = len(stages.EXECUTIONS)
    started = time.perf_counter()
    result = CliRunner().invoke(main, args)
    return result, stages.EXECUTIONS[before:], time.perf_counter() - started


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not DATA.is_dir() or not WEIGHTS.is_file():
        pytest.skip("shared data set or weights not present")
    root = tmp_path_factory.mktemp("pipeline")
    result, ran, seconds = _all(root / "build", root / "dist")
    assert result.exit_code == 0, result.output
    return root, ran, seconds


def test_cold_build_runs_every_stage_and_leaves_a_bundle(built):
    root, ran, _ = built
    for stage in ("features", "train", "eval", "export", "verify"):
        assert any(name.startswith(stage) for name in ran), (stage, ran)
    bundle = root / "dist" / "lite"
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {entry["path"] for entry in manifest["files"]}
    assert {"model_int8.ort", "model_int8.onnx", "model_fp32.onnx", "model.mindir", "labels.json"} <= names
    assert {"preprocessing.json", "parity.json", "eval.json", "README.md"} <= names
    assert manifest["target"] == "lite" and manifest["weights"]["sha256"]
    assert manifest["versions"]["mindspore"] == "2.7.0"
    assert manifest["metrics"]["parity"] == "pass"
    assert manifest["metrics"]["top1"] >= 0.96
    parity = json.loads((bundle / "parity.json").read_text())
    assert {row["kind"] for row in parity["artifacts"]} == {"onnx_fp32", "onnx_int8", "ort_int8", "ort_fp32", "mindir"}
    assert (bundle / "report.html").is_file()


def test_int8_is_small_and_accurate(built):
    root, _, _ = built
    bundle = root / "dist" / "lite"
    assert (bundle / "model_int8.onnx").stat().st_size <= 0.30 * (bundle / "model_fp32.onnx").stat().st_size


def test_second_run_recomputes_nothing_in_under_10_s(built):
    root, _, _ = built
    result, ran, seconds = _all(root / "build", root / "dist")
    assert result.exit_code == 0, result.output
    assert ran == []
    assert seconds < 10


def test_check_bundle_catches_a_changed_byte(built, tmp_path):
    root, _, _ = built
    copy = tmp_path / "lite"
    shutil.copytree(root / "dist" / "lite", copy)
    assert CliRunner().invoke(main, ["check-bundle", str(copy)]).exit_code == 0
    data = bytearray((copy / "model_int8.ort").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model_int8.ort").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["check-bundle", str(copy)])
    assert result.exit_code == 1
    assert "model_int8.ort" in result.output


def test_failing_stage_keeps_the_previous_bundle(built, tmp_path):
    root, _, _ = built
    targets = tmp_path / "targets"
    shutil.copytree(TARGETS, targets)
    profile = (targets / "lite.toml").read_text()
    (targets / "edge.toml").write_text(profile)
    dist = tmp_path / "dist"
    result, _, _ = _all(root / "build", dist, "--target", "edge", targets=targets)
    assert result.exit_code == 0, result.output
    good = _digest(dist / "edge")
    # An impossible int8 tolerance: verify must fail, and the good bundle must survive.
    (targets / "edge.toml").write_text(profile.replace("min_cosine = 0.95", "min_cosine = 0.99999"))
    result, ran, _ = _all(root / "build", dist, "--target", "edge", targets=targets)
    assert result.exit_code == 1
    assert "parity check failed" in result.output and "onnx_int8" in result.output
    assert ran == ["verify"]
    assert _digest(dist / "edge") == good
    assert CliRunner().invoke(main, ["check-bundle", str(dist / "edge")]).exit_code == 0
    assert "verify" in (dist / "edge" / "report.md").read_text()


def test_lite_build_chooses_its_input_size_by_cross_validation(built):
    root, ran, _ = built
    assert "resolution" in ran
    record = json.loads((root / "build" / "resolution-lite" / "resolution.json").read_text())
    rows = {row["size"]: row for row in record["sizes"]}
    assert set(rows) == {224, 192, 160} and record["reference"] == 224
    assert 0.88 <= rows[224]["cv_accuracy"] <= 0.97
    for row in rows.values():  # paired against 224 on the same images and folds
        assert row["paired_gain"]["gain"] == pytest.approx(row["cv_accuracy"] - rows[224]["cv_accuracy"], abs=1e-9)
        assert row["cv_interval"][0] <= row["cv_accuracy"] <= row["cv_interval"][1]
    within = [s for s, r in rows.items() if r["cv_accuracy"] >= rows[224]["cv_accuracy"] - 0.005 - 1e-12]
    assert record["chosen"] == min(within)
    bundle = root / "dist" / "lite"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["metrics"]["input_size"] == record["chosen"]
    assert json.loads((bundle / "preprocessing.json").read_text())["size"] == record["chosen"]
    assert json.loads((bundle / "resolution.json").read_text()) == record


def test_a_smaller_chosen_size_flows_through_every_artifact(built, tmp_path):
    """With a budget any size meets, the build ships 160x160 models that pass parity at 160."""
    import onnx

    root, _, _ = built
    build = tmp_path / "build"
    shutil.copytree(root / "build", build)  # reuses the feature caches the resolution stage filled
    targets = tmp_path / "targets"
    shutil.copytree(TARGETS, targets)
    profile = (targets / "lite.toml").read_text().replace("max_accuracy_drop_pt = 0.5\n", "max_accuracy_drop_pt = 50\n")
    # measured: int8 agrees with fp32 on 126 of 130 val images at 160 (96.9 %), lite asks 97 %
    profile = profile.replace("top1_agreement = 0.97", "top1_agreement = 0.95")
    (targets / "small.toml").write_text(profile)
    result, _, _ = _all(build, tmp_path / "dist", "--target", "small", targets=targets)
    assert result.exit_code == 0, result.output
    assert "input 160x160" in result.output
    bundle = tmp_path / "dist" / "small"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["metrics"]["input_size"] == 160 and manifest["metrics"]["parity"] == "pass"
    assert manifest["metrics"]["top1"] >= 0.85
    fp32 = onnx.load(str(bundle / "model_fp32.onnx")).graph.input[0].type.tensor_type.shape.dim
    int8 = onnx.load(str(bundle / "model_int8.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in fp32][1:] == [3, 160, 160]
    assert [d.dim_value for d in int8][1:] == [160, 160, 3]
    parity = json.loads((bundle / "parity.json").read_text())
    assert all(row["status"] == "pass" for row in parity["artifacts"])
    assert "160x160" in (bundle / "README.md").read_text()
