"""`kill -9` of `edge-build all --target lite` at 14 points over every stage, chained on one build dir.

Each kill point is a real subprocess SIGKILLed either by the atomic-write test hook
(EDGE_BUILD_TEST_KILL_AFTER_WRITES / _MATCH: right after a temp file is complete, before
it is renamed over its target) or a fixed time after the build logs a line (in the middle
of a computation). Every run after a kill is the rerun of the previous one; after each
kill the published bundle (if any) still passes check-bundle, and the final run must
complete with a bundle that passes check-bundle and the same figures as an uninterrupted
build.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from harness import REPO, Reference, Run, all_args, build_all, check_bundle, command, environment, metrics

from edge_build import bundle
from edge_build.atomic import KILL_AFTER_WRITES_ENV, KILL_MATCH_ENV

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@dataclass(frozen=True)
class KillPoint:
    name: str
    glob: str = ""  # glob of the target, relative to the root of build/ and dist/; "" for a time-based kill
    nth: int = 1
    after_line: str = ""  # time-based: kill `delay_s` after stderr shows a line containing this
    delay_s: float = 0.0


#: In pipeline order: each point lies in work the previous kill left undone. The time-based delays
#: are short against the computations they interrupt (calibration, reference forward: several seconds).
CHAIN = [
    KillPoint("weights: backbone checkpoint written, not renamed", "build/weights/*/backbone.ckpt"),
    KillPoint("features: backbone ONNX export", "build/features/backbone/*/backbone.onnx"),
    KillPoint("features: second cache shard (first 512 images saved)", "build/features/cache/*/*.npz", nth=2),
    KillPoint("features: assembled val split", "build/features/set/val.npz"),
    KillPoint("train: network checkpoint", "build/train/network.ckpt"),
    KillPoint("eval: results written, stage record not renamed", "build/eval/record.json"),
    KillPoint("export: ONNX", "build/export/network.onnx"),
    KillPoint("quantize: mid-calibration (time)", after_line="quantize: calibrating", delay_s=1.0),
    KillPoint("quantize: int8 ORT", "build/quantize-lite/model_int8.ort"),
    KillPoint("ort: fp32 ORT", "build/ort-lite/network.ort"),
    KillPoint("verify: mid-reference forward (time)", after_line="MindSpore reference forward", delay_s=1.0),
    KillPoint("bundle: manifest in the staging dir", "dist/.lite.staging/manifest.json"),
    KillPoint("report: written into the published bundle", "dist/lite/report.html"),
    KillPoint("bundle: swapped in, old bundle not yet removed", "dist/lite"),
]


def _kill_by_write(root: Path, point: KillPoint) -> Run:
    build, dist = root / "build", root / "dist"
    env = {KILL_AFTER_WRITES_ENV: point.nth, KILL_MATCH_ENV: str(root / point.glob)}
    return build_all(build, dist, **env)


def _kill_by_time(root: Path, point: KillPoint) -> Run:
    args = [str(a) for a in all_args(root / "build", root / "dist")]
    started = time.perf_counter()
    process = subprocess.Popen(
        command(args), cwd=REPO, env=environment(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(process.stdout.read()), daemon=True)
    reader.start()
    err = []
    for line in process.stderr:
        err.append(line)
        if point.after_line in line:
            time.sleep(point.delay_s)
            process.send_signal(signal.SIGKILL)
            break
    err.append(process.stderr.read())
    process.wait(timeout=60)
    reader.join(timeout=10)
    return Run(args, process.returncode, "".join(out), "".join(err), time.perf_counter() - started)


def _published_bundle_is_intact(dist: Path) -> None:
    if (dist / "lite" / "manifest.json").is_file():
        result = bundle.check_bundle(dist / "lite")
        assert result.ok, result.problems


def _left_temp_file(root: Path, point: KillPoint) -> bool:
    pattern = Path(point.glob)
    return any(root.glob(str(pattern.parent / f".{pattern.name}.*.tmp")))


def test_kill_chain_ends_like_an_uninterrupted_build(reference: Reference, tmp_path):
    root = tmp_path
    dist = root / "dist"
    started = time.perf_counter()
    for number, point in enumerate(CHAIN, 1):
        run = _kill_by_time(root, point) if point.after_line else _kill_by_write(root, point)
        (root / f"run{number:02d}.log").write_text(str(run))
        print(f"kill {number:2d} {point.name}: exit {run.returncode} after {run.seconds:.1f} s", file=sys.stderr)
        assert run.killed, f"kill point not reached: {point.name}\n{run}"
        if point.glob and point.glob != "dist/lite":
            assert _left_temp_file(root, point), f"{point.name}: no temp file left: the kill did not land mid-write"
        if "mid-calibration" in point.name:  # its scratch copy of the model sits in the build dir, not /tmp
            assert list((root / "build" / ".scratch").glob("edge-build-quantize-*/prepared.onnx"))
        if "second cache shard" in point.name:
            shards = list((root / "build" / "features" / "cache").glob("*/*.npz"))
            assert len(shards) == 1, shards
            with np.load(shards[0], allow_pickle=False) as npz:
                assert len(npz["sha256"]) == 512
        _published_bundle_is_intact(dist)
    final = build_all(root / "build", dist)
    print(f"final rerun: exit {final.returncode} after {final.seconds:.1f} s", file=sys.stderr)
    print(f"chain of {len(CHAIN)} kills + final run: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    assert final.returncode == 0, str(final)
    assert check_bundle(dist / "lite").returncode == 0
    assert metrics(dist, root / "build") == reference.metrics
    assert not list(dist.glob(".lite*")), "bundle staging or old bundle left behind"
    assert not (root / "build" / ".scratch").exists(), "scratch directories of killed exports/quantizations left behind"
    leftovers = [p for p in (root / "build").rglob(".*.tmp") if "cache" not in p.parts]
    assert not leftovers, f"temp files of killed writers left in stage directories: {leftovers}"
