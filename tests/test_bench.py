"""Benchmarks: statistics, child processes per artifact, interleaving, bench.json, history, the CLI gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bench_models import convnet
from click.testing import CliRunner
from PIL import Image

from edge_build import bench, history
from edge_build.bench import BenchSettings, Latency, Subject, measure_subjects, run_bench
from edge_build.cli import main
from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing
from edge_build.targets import load_target
from edge_build.taxonomy import CODES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LITERT = SHARED / "weights" / bench.LITERT_REFERENCE
QUICK = BenchSettings(target="quick", batch_sizes=(1, 2), warmup=1, runs=6, rounds=3, max_time_s=1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "small": convnet(root / "small.onnx", width=8, depth=1, size=32),
        "heavy": convnet(root / "heavy.onnx", width=64, depth=6, size=32),
    }


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """One 40x40 image per class in val (and train, for the layout)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for code in CODES:
            folder = root / split / code
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    return root


def test_latency_statistics_from_rounds():
    lat = Latency.from_rounds(4, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert (lat.runs, lat.p50_ms, lat.min_ms, lat.max_ms, lat.mean_ms) == (6, 3.5, 1.0, 6.0, 3.5)
    assert lat.p90_ms == pytest.approx(5.5) and lat.p99_ms == pytest.approx(5.95)
    assert lat.std_ms == pytest.approx(np.std([1, 2, 3, 4, 5, 6], ddof=1))
    assert lat.throughput_ips == pytest.approx(4 * 1000 / 3.5)
    assert lat.round_p50_ms == [2.0, 5.0] and lat.spread_ms == 1.5


def test_settings_come_from_the_target_profile():
    lite = BenchSettings.from_target(load_target("lite", ROOT / "targets"))
    assert (lite.target, lite.threads, lite.batch_sizes, lite.warmup, lite.runs) == ("lite", 2, (1, 8), 50, 300)
    assert lite.latency_budget_ms == 2.0 and not lite.wants_cuda
    assert BenchSettings.from_target(load_target("gpu", ROOT / "targets")).wants_cuda


def test_gpu_target_without_gpu_refuses_latency(tmp_path, models):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    gpu = load_target("gpu", ROOT / "targets")
    with pytest.raises(EdgeBuildError, match="refusing to report CPU timings as GPU latency") as info:
        run_bench(gpu, {"onnx_fp32": models["small"]}, None, None, tmp_path / "out", tmp_path / "hist")
    assert "NVIDIA GPU" in info.value.hint
    report = run_bench(
        gpu, {"onnx_fp32": models["small"]}, None, None, tmp_path / "out", tmp_path / "hist", require_device=False
    )
    assert report.refused and report.results == []
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["refused"] == report.refused
    assert not (tmp_path / "hist").exists()  # a refusal is no measurement: nothing goes into the history
    assert "refusing" in bench.render_table(report)


def _sleeper(name: str, ms: float) -> Subject:
    spec = {"runtime": "factory", "factory": "bench_models:sleep_runner", "args": {"ms": ms}, "threads": 2}
    return Subject(name, "artifact", "factory", spec)


def test_planted_sleep_latency_is_measured_in_interleaved_child_processes():
    settings = BenchSettings(target="t", batch_sizes=(1,), warmup=2, runs=12, rounds=4)
    results, schedule = measure_subjects(
        [_sleeper("a", 2.0), _sleeper("b", 6.0)], settings, None, Preprocessing(), lambda _: None
    )
    a, b = results
    # a sleep never returns early; the upper bounds leave room for a busy shared machine
    assert a.latency[1].min_ms >= 2.0 and a.latency[1].p50_ms < 5.0
    assert b.latency[1].min_ms >= 6.0 and b.latency[1].p50_ms < 9.0
    assert 2.5 < b.latency[1].p50_ms - a.latency[1].p50_ms < 6.0
    assert a.latency[1].runs == b.latency[1].runs == 12  # 4 rounds x 3 runs, first of each slice dropped
    assert [name for _, _, name in schedule] == ["a", "b"] * 4  # A B A B ...
    assert a.idle_cpu_s < 0.2 and b.idle_cpu_s < 0.2  # a waiting child does not burn the cores
    assert a.peak_rss_mb > 10 and a.load_ms >= 0 and a.first_run_ms >= 2.0


def test_broken_artifact_fails_naming_it(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(EdgeBuildError, match=r"benchmark of 'onnx_int8'.*broken\.onnx"):
        run_bench(QUICK, {"onnx_int8": broken}, None, None, tmp_path / "out", None)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(EdgeBuildError, match=r"no benchmark runtime for '\.bin'"):
        run_bench(QUICK, {"x": tmp_path / "x.bin"}, None, None, tmp_path / "out", None)


def test_bench_json_history_and_top1_through_the_runtime(tmp_path, models, tiny_data):
    report = run_bench(
        QUICK, {"small": models["small"]}, None, tiny_data, tmp_path / "out", tmp_path / "hist", force=True
    )
    payload = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert payload["schema"] == bench.SCHEMA and payload["target"] == "quick"
    row = payload["results"][0]
    assert set(row["latency"]) == {"1", "2"}
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput_ips"):
        assert row["latency"]["1"][key] > 0 or key == "std_ms"
    assert row["sha256"] and row["size_bytes"] == models["small"].stat().st_size
    assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 0 and row["load_ms"] > 0

    # top-1 computed in the child through ONNX Runtime equals the same computation here
    from edge_build.dataset import list_split
    from edge_build.images import load_rgb
    from edge_build.runners import OnnxRunner

    refs = list_split(tiny_data, "val")
    pre = Preprocessing(size=32)
    logits = OnnxRunner(models["small"]).run(pre.prepare_batch([load_rgb(r.path) for r in refs]))
    expected = 100.0 * np.mean(np.argmax(logits, axis=1) == [r.label for r in refs])
    assert report.result("small").top1 == pytest.approx(expected)
    assert report.result("small").accuracy_images == 26

    records = history.read_records(report.history_path)
    assert len(records) == 1 and records[0]["target"] == "quick"
    assert records[0]["artifacts"]["small"]["sha256"] == row["sha256"]
    assert records[0]["latency"]["small"]["1"]["p50_ms"] == pytest.approx(row["latency"]["1"]["p50_ms"], abs=1e-3)
    assert "p50 ms" in bench.render_table(report)

    # Cached stage: unchanged inputs are not measured again (no new history record) unless forced.
    again = run_bench(QUICK, {"small": models["small"]}, None, tiny_data, tmp_path / "out", tmp_path / "hist")
    assert again.created == report.created and len(history.read_records(report.history_path)) == 1


@pytest.mark.skipif(not LITERT.is_file(), reason="shared LiteRT reference model not present")
def test_litert_reference_row_and_ratios(tmp_path, models):
    settings = BenchSettings(target="ratio", batch_sizes=(1, 2), warmup=2, runs=8, rounds=4, max_time_s=1.0)
    report = run_bench(
        settings, {"small": models["small"]}, None, None, tmp_path / "out", None, litert_reference=LITERT
    )
    litert, small = report.result("litert"), report.result("small")
    assert litert.role == "reference" and litert.top1 is None and litert.input_format == "uint8_nhwc"
    assert litert.input_size == 224 and litert.size_bytes == LITERT.stat().st_size
    for batch in (1, 2):
        expected = small.latency[batch].p50_ms / litert.latency[batch].p50_ms
        assert small.ratios[batch]["vs_litert"] == pytest.approx(expected)
    # the reference graph has a fixed batch of 1: batch 2 is two invokes, and the row says so
    assert litert.latency[2].runs >= 8 and any("batch N = N batch-1 invokes" in n for n in litert.notes)


def _write_target(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "quick.toml").write_text(
        'description = "test profile"\nartifacts = ["onnx_fp32"]\n'
        "[runtime]\nthreads = 2\n[bench]\nbatch_sizes = [1]\nwarmup = 2\nruns = 12\nmin_time_s = 0.0\n",
        encoding="utf-8",
    )
    return directory


def test_cli_catches_a_planted_slowdown_and_names_the_artifact(tmp_path, models, tiny_data, monkeypatch):
    monkeypatch.delenv("EDGE_BUILD_HISTORY", raising=False)
    targets = _write_target(tmp_path / "targets")
    common = [
        "bench",
        "--target",
        "quick",
        "--targets",
        str(targets),
        "--data",
        str(tiny_data),
        "--build",
        str(tmp_path / "build"),
        "--history",
        str(tmp_path / "hist"),
        "--no-references",
    ]
    runner = CliRunner()
    first = runner.invoke(main, [*common, "--artifact", f"model={models['small']}", "--fail-on-regression", "10"])
    assert first.exit_code == 0, first.output
    assert "no previous record" in first.output
    # Same name, a genuinely heavier model: the p50 grows many times over.
    second = runner.invoke(main, [*common, "--artifact", f"model={models['heavy']}", "--fail-on-regression", "10"])
    assert second.exit_code == 1, second.output
    assert "latency regression over 10 %" in second.output and "model batch 1" in second.output
    assert "Traceback" not in second.output
    # --json prints bench.json; --compare shows the change against the previous record
    third = runner.invoke(main, [*common, "--artifact", f"model={models['heavy']}", "--json", "--compare"])
    assert third.exit_code == 0, third.output
    payload = json.loads(third.stdout)
    assert payload["schema"] == bench.SCHEMA and payload["previous"]["git_commit"]
    assert payload["comparison"][0]["artifact"] == "model"
    assert len(list((tmp_path / "hist").glob("*.jsonl"))) == 1


def test_cli_gpu_target_refuses_without_a_gpu(tmp_path, models, tiny_data):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--target",
            "gpu",
            "--targets",
            str(ROOT / "targets"),
            "--data",
            str(tiny_data),
            "--build",
            str(tmp_path / "build"),
            "--history",
            str(tmp_path / "hist"),
        ],
    )
    assert result.exit_code == 2  # refused up front, before looking for artifacts that cannot run anyway
    assert "refusing to report CPU timings as GPU latency" in result.output and "Traceback" not in result.output


def test_a_stopped_child_dies_with_its_parent(tmp_path, models):
    """The parent killed outright (no cleanup) must not leave a stopped child behind."""
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import os\n"
        "from edge_build.bench_child import Child, child_env\n"
        f"spec = {{'runtime': 'onnxruntime', 'path': {str(models['small'])!r}, 'threads': 1,"
        " 'providers': ['CPUExecutionProvider']}\n"
        "child = Child('small', spec, child_env(1))\n"
        "child.request('warmup', batch=1, runs=1)\n"
        "print(child.process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        psutil.Process(pid).kill()
        pytest.fail("the benchmark child outlived its parent")


def test_reference_accepts_a_trained_model_or_its_build_directory(tmp_path):
    from types import SimpleNamespace

    assert bench.reference_build_dir(tmp_path) == tmp_path
    assert bench.reference_build_dir(SimpleNamespace(directory=tmp_path / "train")) == tmp_path


def test_child_memory_is_its_own_not_the_parents(tmp_path, models):
    ballast = np.ones(300 * 1024 * 1024, np.uint8)  # a 300 MB parent must not show up in the child
    report = run_bench(QUICK, {"small": models["small"]}, None, None, tmp_path / "out", None)
    row = report.result("small")
    assert ballast.sum() > 0
    assert 10 < row.baseline_rss_mb <= row.peak_rss_mb < 250


def test_cli_does_not_bench_a_build_another_command_is_changing(tmp_path, models, tiny_data, monkeypatch):
    from edge_build.locking import build_lock

    monkeypatch.delenv("EDGE_BUILD_HISTORY", raising=False)
    targets = _write_target(tmp_path / "targets")
    build = tmp_path / "build"
    args = ["bench", "--target", "quick", "--targets", str(targets), "--data", str(tiny_data), "--build", str(build)]
    args += ["--history", str(tmp_path / "hist"), "--no-references", "--artifact", f"model={models['small']}"]
    with build_lock(build):  # as if `edge-build all` were running in this build directory
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "another edge-build is already working in" in result.output and "--wait" in result.output
    assert not (tmp_path / "hist").exists() and not (build / "bench").exists()
    assert CliRunner().invoke(main, args).exit_code == 0  # once the lock is free
