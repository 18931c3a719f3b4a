"""Evaluation: metrics, leakage between splits, validation only; the whole experiment end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edge_build import evaluation, taxonomy
from edge_build.evaluation import evaluate, leakage, metrics
from edge_build.features import FeatureSet, SplitFeatures
from edge_build.preprocessing import Preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "garbage_26x100"
TF1 = SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite"
K = taxonomy.NUM_CLASSES


def one_hot_logits(predicted: list[int]) -> np.ndarray:
    logits = np.zeros((len(predicted), K), np.float32)
    logits[np.arange(len(predicted)), predicted] = 5.0
    return logits


def test_metrics_top1_top5_bins_confusion():
    labels = np.array([0, 0, 10, 25])
    logits = one_hot_logits([0, 1, 10, 24])
    logits[3, 25] = 4.0  # true class second best: a top-5 hit
    logits[1, 0] = 1.0  # true class of row 1 somewhere in its top 5 as well
    result = metrics(logits, labels)
    assert result["top1"] == pytest.approx(0.5) and result["correct"] == 2
    assert result["top5"] == pytest.approx(1.0)
    # 0 -> 1 stays in the recyclable bin; 25 -> 24 stays in the kitchen bin: every bin decision is right.
    assert result["bin_accuracy"] == pytest.approx(1.0)
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 4 and confusion[0, 0] == 1 and confusion[0, 1] == 1 and confusion[25, 24] == 1
    assert result["per_class"][0] == {**result["per_class"][0], "n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_class"][5]["accuracy"] is None
    wrong_bin = metrics(one_hot_logits([18]), np.array([0]))  # recyclable predicted as hazardous
    assert wrong_bin["bin_accuracy"] == 0.0 and np.array(wrong_bin["bin_confusion"])[0, 2] == 1


def split(name: str, labels: list[int], sha: list[str], pixels: list[str], phash: list[int]) -> SplitFeatures:
    return SplitFeatures(
        split=name,
        features=np.eye(K, dtype=np.float32)[labels],
        labels=np.array(labels),
        keys=[f"{name}/{taxonomy.CODES[c]}/{i:03d}.png" for i, c in enumerate(labels)],
        sha256=sha,
        pixel_sha256=pixels,
        phash=np.array(phash, dtype=np.uint64),
        dhash=np.array(phash, dtype=np.uint64),
    )


class StoredFeatures(FeatureSet):
    def content_hash(self, split: str) -> str:
        return split * 8


def leaky_features() -> FeatureSet:
    far = [0x0123456789ABCDEF, 0xFEDCBA9876543210, 0x0F0F0F0F0F0F0F0F, 0xF0F0F0F0F0F0F0F0]
    train = split("train", [0, 1, 2, 3], ["t0", "t1", "t2", "t3"], ["p0", "p1", "p2", "p3"], far)
    # val 0: same file as train 0; val 1: same pixels as train 1; val 2: near train 2 (1 bit); val 3: new.
    val = split(
        "val",
        [0, 1, 2, 3],
        ["t0", "v1", "v2", "v3"],
        ["p0", "p1", "q2", "q3"],
        [far[0], 0x1111111111111111, far[2] ^ 1, 0x3C3C3C3C3C3C3C3C],
    )
    return StoredFeatures({"train": train, "val": val}, "synthetic", "k" * 64, Path("/nonexistent"))


def test_leakage_finds_same_file_same_pixels_and_near_duplicates():
    leaks = leakage(leaky_features())
    assert leaks["same_file"] == ["val/00_00/000.png"]
    assert leaks["same_pixels"] == ["val/00_01/001.png"]
    assert leaks["near_duplicate"] == ["val/00_02/002.png"]
    assert leaks["_any"].tolist() == [True, True, True, False]


@dataclass
class StubTrained:
    checkpoint: Path
    head_checkpoint: Path
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing(size=16))
    num_classes: int = K

    def summary(self) -> dict:
        return {"stub": True}


@pytest.fixture
def stub_eval(tmp_path, monkeypatch):
    """A data set on disk matching `leaky_features`, and a network stub that records what it reads."""
    data = tmp_path / "data"
    for split_name in ("train", "val"):
        for i, code in enumerate(taxonomy.CODES[:4]):
            path = data / split_name / code / f"{i:03d}.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(path)
    (tmp_path / "net.ckpt").write_bytes(b"net")
    (tmp_path / "head.ckpt").write_bytes(b"head")
    trained = StubTrained(tmp_path / "net.ckpt", tmp_path / "head.ckpt")
    read: list[Path] = []

    def network_logits(model, paths, progress):
        from edge_build.images import load_rgb

        read.extend(Path(p) for p in paths)
        [load_rgb(p) for p in paths]
        return one_hot_logits([0, 1, 5, 3])  # val 2 (a near-duplicate) is answered wrong

    monkeypatch.setattr(evaluation, "_network_logits", network_logits)
    monkeypatch.setattr(
        evaluation, "_head_arrays", lambda model: (np.eye(K, dtype=np.float32), np.zeros(K, np.float32))
    )
    return data, trained, read


def test_evaluation_reads_only_validation_images(tmp_path, stub_eval):
    data, trained, read = stub_eval
    result = evaluate(leaky_features(), data, tmp_path / "build", trained=trained, progress=False)
    assert sorted(read) == sorted((data / "val").rglob("*.png"))
    assert all("train" not in p.relative_to(data).parts for p in read)
    assert result["split"] == "val" and all(p["key"].startswith("val/") for p in result["predictions"])
    on_disk = json.loads((tmp_path / "build" / "eval" / "eval.json").read_text())
    assert on_disk["schema"] == evaluation.SCHEMA and on_disk["top1"] == result["top1"]
    assert (tmp_path / "build" / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_reports_accuracy_with_and_without_leaked_images(tmp_path, stub_eval):
    data, trained, _ = stub_eval
    result = evaluate(leaky_features(), data, tmp_path / "build", trained=trained, progress=False)
    assert result["top1"] == pytest.approx(0.75)
    assert result["subsets"]["without_exact_duplicates"] == {
        "n": 2,
        "correct": 1,
        "top1": 0.5,
        "top5": 1.0,
        "bin_accuracy": 1.0,
    }
    assert result["subsets"]["without_any_duplicates"]["n"] == 1
    assert result["subsets"]["without_any_duplicates"]["top1"] == 1.0
    assert any("3 of 4 validation images also occur in the training split" in w for w in result["warnings"])
    assert [p["leak"] for p in result["predictions"]] == ["same_file", "same_pixels", "near_duplicate", None]
    # The cached features (one-hot of the true class) through the identity head disagree on val 2.
    assert result["consistency"]["top1_agreement_with_cached_features"] == pytest.approx(0.75)


def test_evaluation_is_cached_on_the_network_and_images(tmp_path, stub_eval):
    from edge_build import stages

    data, trained, _ = stub_eval
    evaluate(leaky_features(), data, tmp_path / "build", trained=trained, progress=False)
    runs = len(stages.EXECUTIONS)
    evaluate(leaky_features(), data, tmp_path / "build", trained=trained, progress=False)
    assert len(stages.EXECUTIONS) == runs
    trained.checkpoint.write_bytes(b"a retrained network")
    evaluate(leaky_features(), data, tmp_path / "build", trained=trained, progress=False)
    assert len(stages.EXECUTIONS) == runs + 1


@pytest.mark.slow
@pytest.mark.skipif(not (TF1.is_file() and DATA.is_dir()), reason="shared weights or data not present")
def test_features_train_eval_predict_end_to_end(tmp_path):
    """The CLI on a small slice of the shared data: features -> train -> eval -> predict."""
    from edge_build.cli import main

    root = tmp_path / "data"
    codes = ("00_02", "01_04", "02_01", "03_03")
    for split_name, count in (("train", 8), ("val", 2)):
        for code in codes:
            (root / split_name / code).mkdir(parents=True)
            for path in sorted((DATA / split_name / code).iterdir())[:count]:
                shutil.copy(path, root / split_name / code / path.name)
    paths = ["--data", str(root), "--weights", str(TF1), "--build", str(tmp_path / "build")]
    runner = CliRunner()
    result = runner.invoke(main, ["features", *paths])
    assert result.exit_code == 0, result.output
    assert "computed 40," in result.output and "runtime  onnxruntime" in result.output

    result = runner.invoke(main, ["train", "--epochs", "6", *paths])
    assert result.exit_code == 0, result.output
    assert "6 epochs" in result.output and "weight decay 0.01" in result.output

    result = runner.invoke(main, ["eval", *paths])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "build" / "eval" / "eval.json").read_text())
    assert report["n"] == 8 and report["top1"] >= 0.75
    assert report["consistency"]["top1_agreement_with_cached_features"] == 1.0
    assert report["consistency"]["max_abs_logit_difference"] < 1e-3

    val_image = next((root / "val" / "03_03").iterdir())
    result = runner.invoke(main, ["predict", str(val_image), "--json", "--build", str(tmp_path / "build")])
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.output)
    assert prediction["code"] == "03_03" and prediction["chinese"] == "香蕉皮" and prediction["bin_code"] == "03"
