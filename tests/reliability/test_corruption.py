"""Every cache entry and intermediate artifact of a real build, corrupted in turn (truncated, one byte
flipped, emptied): detected by hash, then rebuilt by `edge-build all`, or refused with the path named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import (
    CORRUPTIONS,
    DATA,
    WEIGHTS,
    Reference,
    build_all,
    check_bundle,
    edge_build,
    flip,
    metrics,
    one_line_error,
)

from edge_build.features import FeatureStore
from edge_build.stages import RECORD_NAME, is_fresh

pytestmark = pytest.mark.reliability


#: Files of a build dir that no stage trusts from an earlier run, and why.
NOT_CACHED = {
    ".lock": "the flock target, empty",
    ".lock.owner": "pid of the lock holder, only quoted in the 'busy' message",
    "doctor/doctor.json": "rewritten by every build before anything reads it",
}


def _stage_dir(path: Path, build: Path) -> Path | None:
    for parent in path.parents:
        if parent == build:
            return None
        if (parent / RECORD_NAME).is_file():
            return parent
    return None


def _classify(path: Path, build: Path) -> str:
    relative = path.relative_to(build)
    if relative.as_posix() in NOT_CACHED:
        return "not cached"
    if relative.parts[:2] == ("features", "cache"):
        return "feature shard" if path.suffix == ".npz" else "store key (written, never read)"
    return "stage output" if _stage_dir(path, build) is not None else "UNPROTECTED"


@pytest.fixture
def build_copy(reference: Reference, tmp_path) -> tuple[Path, Path]:
    return reference.copy(tmp_path)


@pytest.mark.slow
def test_every_file_of_a_build_is_protected_and_every_corruption_detected(build_copy):
    build, _ = build_copy
    files = sorted(p for p in build.rglob("*") if p.is_file())
    kinds = {p: _classify(p, build) for p in files}
    assert "UNPROTECTED" not in kinds.values(), [str(p) for p, k in kinds.items() if k == "UNPROTECTED"]
    records = {d: json.loads((d / RECORD_NAME).read_text()) for d in {_stage_dir(p, build) for p in files} if d}
    for stage_dir, record in records.items():
        assert is_fresh(stage_dir, record["inputs"]) is not None, f"{stage_dir} not fresh before corrupting"
    checked = 0
    for path, kind in kinds.items():
        if kind not in ("stage output", "feature shard"):
            continue
        original = path.read_bytes()
        variants = dict(CORRUPTIONS)
        if path.name == RECORD_NAME:  # a flip anywhere in a record, not only mid-file, must be caught
            spread = range(7, len(original), 211)
            variants.update({f"byte {at} flipped": (lambda d, at=at: flip(d, at)) for at in spread})
        for name, corrupt in variants.items():
            path.write_bytes(corrupt(original))
            try:
                if kind == "feature shard":
                    store = FeatureStore(path.parent)
                    entries = store.load()
                    assert [d.split(" ")[0] for d in store.damaged] == [path.name], (path, name)
                    assert not path.exists()  # removed, its images recomputed on the next extraction
                    assert entries  # the other shards still serve
                else:
                    stage_dir = _stage_dir(path, build)
                    fresh = is_fresh(stage_dir, records[stage_dir]["inputs"])
                    assert fresh is None, f"{path.relative_to(build)} {name}: not detected"
            finally:
                path.write_bytes(original)
            checked += 1
    print(f"{checked} corruptions of {len(files)} files detected")
    assert checked >= 3 * len([k for k in kinds.values() if k in ("stage output", "feature shard")])


@pytest.mark.slow
def test_corrupted_build_is_rebuilt_to_the_same_result(reference: Reference, build_copy):
    build, dist = build_copy
    main_key = json.loads((build / "features" / "set" / "features.json").read_text())["key"][:16]
    shard = sorted((build / "features" / "cache" / main_key).glob("*.npz"))[0]  # the 224 store, not 192/160's
    with np.load(shard, allow_pickle=False) as npz:
        shard_images = len(npz["sha256"])
    damage = {
        next(build.glob("weights/*/backbone.ckpt")): "truncated",
        shard: "one byte flipped",
        build / "features" / "set" / "train.npz": "emptied",
        build / "train" / "head.ckpt": "one byte flipped",
        build / "eval" / "eval.json": "truncated",
        build / "ort-lite" / "network.ort": "emptied",
        build / "eval" / RECORD_NAME: "one byte flipped",
    }
    for path, kind in damage.items():
        path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    run = build_all(build, dist)
    assert run.returncode == 0, str(run)
    ran = run.stdout.split("stages run: ")[1].splitlines()[0].split(", ")
    assert {"weights", "features", "train", "eval", "ort"} <= set(ran), ran
    assert "damaged feature cache shard" in run.stderr and shard.name in run.stderr
    features = json.loads((build / "features" / "set" / "features.json").read_text())
    assert features["computed"] == shard_images  # exactly the damaged shard's images
    assert check_bundle(dist / "lite").returncode == 0
    assert metrics(dist, build) == reference.metrics


@pytest.mark.slow
def test_commands_that_do_not_rebuild_refuse_a_damaged_input_naming_it(build_copy, tmp_path):
    build, _ = build_copy
    checkpoint = build / "train" / "network.ckpt"
    checkpoint.write_bytes(flip(checkpoint.read_bytes()))
    run = edge_build("predict", WEIGHTS.parent / "hot_dog.jpg", "--build", build, offline=False, timeout=300)
    assert run.returncode == 2 and str(checkpoint) in one_line_error(run), str(run)

    onnx_model = build / "export" / "network.onnx"
    onnx_model.write_bytes(onnx_model.read_bytes()[:1000])
    run = edge_build("quantize", "--build", build, "--data", DATA, offline=False, timeout=300)
    assert run.returncode == 2 and str(onnx_model) in one_line_error(run), str(run)
