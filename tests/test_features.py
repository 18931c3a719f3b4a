"""Feature cache: content-addressed invalidation, corruption and interruption; the ONNX runtime's parity."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from edge_build import features as feat
from edge_build.features import extract_features, load_features
from edge_build.preprocessing import Preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "garbage_26x100"
TF1 = SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite"


SMALL = Preprocessing(size=32)


@dataclass
class StubWeights:
    """What the feature stage reads from ImportedWeights (no MindSpore needed)."""

    sha256: str = "ab" * 32
    padding: str = "tf_same"
    preprocessing: Preprocessing = SMALL


class CountingExtractor:
    """Replaces the backbone: a deterministic function of the pixels, counting the images it sees."""

    seen: ClassVar[list[int]] = []

    def __init__(self, runtime, weights, onnx_path):
        self.runtime = runtime

    def run(self, batch: np.ndarray) -> np.ndarray:
        CountingExtractor.seen.append(len(batch))
        means = batch.mean(axis=(2, 3))  # (N, 3)
        return np.tile(means, (1, 427))[:, :1280].astype(np.float32)


@pytest.fixture
def counting(monkeypatch):
    CountingExtractor.seen = []
    monkeypatch.setattr(feat, "_Extractor", CountingExtractor)
    return CountingExtractor


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "train" / ["00_00", "01_03", "03_03"][i % 3] / f"{i:03d}.png", seed=i)
    for i in range(3):
        write_image(root / "val" / ["00_00", "01_03", "03_03"][i] / f"v{i}.png", seed=100 + i)
    return root


def extract(data: Path, build: Path, weights=None, log=None):
    return extract_features(data, weights or StubWeights(), build, progress=False, runtime="mindspore", log=log)


def images_computed(counter) -> int:
    return sum(counter.seen)


def test_first_run_computes_every_image_then_nothing(data, tmp_path, counting):
    fs = extract(data, tmp_path / "build")
    assert images_computed(counting) == 9
    assert fs.info["computed"] == 9 and fs.info["ran"]
    train = fs["train"]
    assert train.features.shape == (6, 1280) and train.features.dtype == np.float32
    assert train.keys[0] == "train/00_00/000.png" and train.labels.tolist() == [0, 0, 13, 13, 25, 25]
    assert fs.runtime == "mindspore"

    again = extract(data, tmp_path / "build")
    assert images_computed(counting) == 9 and not again.info["ran"]
    np.testing.assert_array_equal(again["train"].features, train.features)
    stored = load_features(tmp_path / "build")
    assert stored["val"].keys == fs["val"].keys and stored.runtime == "mindspore"


def test_changing_adding_removing_one_image_recomputes_only_it(data, tmp_path, counting):
    build = tmp_path / "build"
    before = extract(data, build)
    write_image(data / "train" / "01_03" / "001.png", seed=999)  # changed content
    changed = extract(data, build)
    assert images_computed(counting) == 10 and changed.info["computed"] == 1 and changed.info["reused"] == 8
    row = changed["train"].keys.index("train/01_03/001.png")
    assert not np.array_equal(changed["train"].features[row], before["train"].features[row])

    write_image(data / "val" / "03_03" / "new.png", seed=555)
    added = extract(data, build)
    assert images_computed(counting) == 11 and len(added["val"]) == 4

    (data / "train" / "00_00" / "000.png").unlink()
    removed = extract(data, build)
    assert images_computed(counting) == 11 and removed.info["ran"] and len(removed["train"]) == 5


def test_identical_images_are_computed_once(data, tmp_path, counting):
    shutil.copy(data / "train" / "00_00" / "000.png", data / "val" / "00_00" / "copy.png")
    fs = extract(data, tmp_path / "build")
    assert images_computed(counting) == 9 and fs.info["unique_images"] == 9
    row = fs["val"].keys.index("val/00_00/copy.png")
    np.testing.assert_array_equal(fs["val"].features[row], fs["train"].features[0])
    assert fs["val"].sha256[row] == fs["train"].sha256[0]


def test_new_weights_recompute_everything(data, tmp_path, counting):
    extract(data, tmp_path / "build")
    extract(data, tmp_path / "build", weights=StubWeights(sha256="cd" * 32))
    assert images_computed(counting) == 18
    extract(data, tmp_path / "build", weights=StubWeights(preprocessing=Preprocessing(size=24)))
    assert images_computed(counting) == 27


def test_a_corrupted_shard_is_detected_and_its_images_recomputed(data, tmp_path, counting):
    build = tmp_path / "build"
    extract(data, build)
    (shard,) = list((build / "features" / "cache").glob("*/*.npz"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (build / "features" / "set" / "train.npz").write_bytes(b"garbage")  # and the assembled file too
    messages: list[str] = []
    fs = extract(data, build, log=messages.append)
    assert images_computed(counting) == 18 and fs.info["computed"] == 9
    assert any("damaged feature cache shard" in m for m in messages)
    assert fs["train"].features.shape == (6, 1280)


def test_a_damaged_assembled_file_is_rebuilt_from_the_store(data, tmp_path, counting):
    build = tmp_path / "build"
    first = extract(data, build)
    (build / "features" / "set" / "val.npz").write_bytes(b"not an npz")
    fs = extract(data, build)
    assert images_computed(counting) == 9 and fs.info["ran"] and fs.info["computed"] == 0
    np.testing.assert_array_equal(fs["val"].features, first["val"].features)


def test_an_extraction_killed_midway_keeps_the_flushed_work(data, tmp_path, monkeypatch, counting):
    build = tmp_path / "build"
    monkeypatch.setattr(feat, "BATCH_SIZE", 2)
    monkeypatch.setattr(feat, "FLUSH_EVERY", 2)
    original = CountingExtractor.run

    def dies_on_third_batch(self, batch):
        if len(CountingExtractor.seen) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(CountingExtractor, "run", dies_on_third_batch)
    # A temp file of a write that was killed half-way lies around too.
    store_dirs = build / "features" / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract(data, build)
    assert images_computed(counting) == 4
    (next(store_dirs.iterdir()) / ".deadbeef.npz.1234.tmp").write_bytes(b"half a shard")
    monkeypatch.setattr(CountingExtractor, "run", original)
    fs = extract(data, build)
    assert fs.info["computed"] == 5 and fs.info["reused"] == 4
    assert len(fs["train"]) == 6 and not fs.info["damaged_shards"]  # the temp file is never read as a shard


@pytest.mark.slow
@pytest.mark.skipif(not (TF1.is_file() and DATA.is_dir()), reason="shared weights or data not present")
def test_onnx_runtime_features_match_mindspore_on_real_images(tmp_path):
    """auto = ONNX Runtime after the parity check; its features agree with MindSpore's (cosine >= 0.9999)."""
    from edge_build.weights import import_weights

    root = tmp_path / "data"
    for split, per_class in (("train", 3), ("val", 1)):
        for code in ("00_02", "02_01", "03_03"):
            for path in sorted((DATA / split / code).iterdir())[:per_class]:
                (root / split / code).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, root / split / code / path.name)
    build = tmp_path / "build"
    weights = import_weights(TF1, build)
    fast = extract_features(root, weights, build, progress=False, runtime="auto")
    assert fast.runtime == "onnxruntime"
    assert fast.info["parity"]["passed"] and fast.info["parity"]["min_cosine"] >= 0.9999
    reference = extract_features(root, weights, build, progress=False, runtime="mindspore")
    assert reference.runtime == "mindspore" and reference.key != fast.key  # separate cache entries
    a, b = fast["train"].features, reference["train"].features
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.9999
    assert a.min() >= 0 and a.max() <= 6.0  # pooled ReLU6 activations
