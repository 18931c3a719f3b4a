"""The data set changes between builds (an image added, removed, modified): the next build notices and
recomputes exactly what depends on it, counted in feature-cache entries and stage executions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from harness import CALIBRATION, DATA, Reference, build_all, check_bundle
from PIL import Image

from edge_build.dataset import list_split
from edge_build.features import PARITY_SAMPLE, extract_features
from edge_build.hashing import sha256_file
from edge_build.weights import load_imported

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


class DataCopy:
    """A private copy of the shared data set (same directory name, so the calibration list applies)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "data" / DATA.name
        shutil.copytree(DATA, self.root)
        self.calibration = root / "calibration"
        shutil.copytree(CALIBRATION, self.calibration)
        listing = json.loads(next(self.calibration.glob("*.json")).read_text())
        self.calibration_keys = {f"{e['split']}/{e['class']}/{e['file']}" for e in listing["images"]}
        shas = sorted(sha256_file(p) for p in self.root.rglob("*") if p.is_file() and p.suffix != ".txt")
        self.sample_limit = shas[PARITY_SAMPLE - 1]  # the backbone's parity sample: the smallest hashes

    def _outside_sample(self, path: Path) -> bool:
        return sha256_file(path) > self.sample_limit

    def pick(self, split: str, avoid: set[str] = frozenset()) -> Path:
        """An image whose change touches neither the calibration list nor the backbone's parity sample."""
        for ref in list_split(self.root, split):
            if ref.key not in self.calibration_keys | avoid and self._outside_sample(ref.path):
                return ref.path
        raise AssertionError(f"no suitable {split} image")

    def add(self, like: Path) -> Path:
        """A new training image: a mirrored copy of `like`, in its class."""
        target = like.with_name("zz_added.jpg")
        quality = 90
        while True:
            Image.open(like).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, quality=quality)
            if self._outside_sample(target):
                return target
            quality -= 1

    def modify(self, path: Path) -> None:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        Image.fromarray(np.clip(pixels + 12, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=92)
        assert self._outside_sample(path)


def _features(data: DataCopy, build: Path):
    weights = load_imported(next((build / "weights").iterdir()))
    return extract_features(data.root, weights, build, progress=False)


def test_each_change_recomputes_only_its_own_image(reference: Reference, tmp_path):
    build, _ = reference.copy(tmp_path)
    data = DataCopy(tmp_path)
    start = _features(data, build)
    assert not start.info["ran"]  # a copied data set with the same content is the same data set
    train_hash, val_hash = start.content_hash("train"), start.content_hash("val")

    added = data.add(data.pick("train"))
    after = _features(data, build)
    assert (after.info["ran"], after.info["computed"]) == (True, 1)
    assert len(after["train"]) == len(start["train"]) + 1
    assert after.content_hash("train") != train_hash and after.content_hash("val") == val_hash
    train_hash = after.content_hash("train")

    data.pick("train", avoid={f"train/{added.parent.name}/{added.name}"}).unlink()
    after = _features(data, build)
    assert (after.info["ran"], after.info["computed"]) == (True, 0)
    assert len(after["train"]) == len(start["train"])
    assert after.content_hash("train") != train_hash and after.content_hash("val") == val_hash
    train_hash = after.content_hash("train")

    data.modify(data.pick("val"))
    after = _features(data, build)
    assert (after.info["ran"], after.info["computed"]) == (True, 1)
    assert after.content_hash("train") == train_hash, "a validation image must not retrain the head"
    assert after.content_hash("val") != val_hash


def test_changed_data_set_reruns_exactly_the_dependent_stages(reference: Reference, tmp_path):
    build, dist = reference.copy(tmp_path)
    data = DataCopy(tmp_path)
    added = data.add(data.pick("train"))
    data.pick("train", avoid={f"train/{added.parent.name}/{added.name}"}).unlink()
    data.modify(data.pick("val"))
    run = build_all(build, dist, data=data.root, calibration=data.calibration)
    assert run.returncode == 0, str(run)
    ran = run.stdout.split("stages run: ")[1].splitlines()[0].split(", ")
    # Not weights, not the backbone export: nothing they read changed. Everything downstream of the features did:
    # the features at each resolution candidate (224, 192, 160), the choice (which hashes the mirrored
    # training images for its folds), then the build at the chosen size.
    resolution = ["features", "features", "features", "resolution", "mirrored-hashes"]
    assert ran == [*resolution, "features", "train", "eval", "export", "quantize", "ort", "verify"], ran
    computed = {}
    for name in ("set-224", "set-192", "set-160", "set"):
        computed[name] = json.loads((build / "features" / name / "features.json").read_text())["computed"]
    # the added and the modified image, nothing else, at each size; the 224 build reuses the choice's features
    assert computed == {"set-224": 2, "set-192": 2, "set-160": 2, "set": 0}
    assert check_bundle(dist / "lite").returncode == 0
    manifest = json.loads((dist / "lite" / "manifest.json").read_text())
    reference_manifest = json.loads((reference.dist / "lite" / "manifest.json").read_text())
    assert manifest["data"]["images_sha256"] != reference_manifest["data"]["images_sha256"]
