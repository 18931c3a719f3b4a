"""Head training: duplicate-aware folds, determinism, the vectorized CV engine, the train stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_build import taxonomy, training
from edge_build.dataset import list_split
from edge_build.errors import EdgeBuildError
from edge_build.features import FeatureSet, SplitFeatures
from edge_build.folds import duplicate_groups, grouped_folds, near_duplicate_pairs, perceptual_hashes
from edge_build.images import load_rgb
from edge_build.training import TrainOptions, cross_validate, fit_head

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "garbage_26x100"
TF1 = SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite"


def synthetic(per_class: int = 16, classes: int = taxonomy.NUM_CLASSES, seed: int = 0, dims: int = 1280):
    """Separable but noisy 'features': one random prototype per class plus noise, ReLU'd like the real ones."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 2, (classes, dims)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    features = np.maximum(prototypes[labels] + rng.normal(0, 1.5, (len(labels), dims)), 0).astype(np.float32)
    return features, labels


def feature_set(features: np.ndarray, labels: np.ndarray, sha256: list[str] | None = None) -> FeatureSet:
    n = len(labels)
    rng = np.random.default_rng(99)
    sha256 = sha256 or [f"{i:064x}" for i in range(n)]
    split = SplitFeatures(
        split="train",
        features=features,
        labels=labels,
        keys=[f"train/{taxonomy.CODES[c]}/{i:05d}.jpg" for i, c in enumerate(labels)],
        sha256=sha256,
        pixel_sha256=list(sha256),
        phash=rng.integers(0, 2**64, n, dtype=np.uint64),  # random 64-bit hashes: ~32 bits apart
        dhash=rng.integers(0, 2**64, n, dtype=np.uint64),
    )
    return FeatureSet(splits={"train": split}, runtime="synthetic", key="k" * 64, directory=Path("/nonexistent"))


# --------------------------------------------------------------------------- folds


def test_duplicate_groups_join_any_shared_key_transitively():
    files = ["a", "b", "c", "d", "a", "e"]
    pixels = ["p1", "p2", "p2", "p3", "p4", "p5"]
    groups = duplicate_groups(files, pixels)
    assert groups[0] == groups[4]  # same file bytes
    assert groups[1] == groups[2]  # same decoded pixels, different bytes
    assert len(set(groups.tolist())) == 4


def test_near_duplicates_need_both_hashes_close():
    phash = [0b0, 0b111, 0xFFFF_FFFF, 0b1]
    dhash = [0b0, 0b1, 0xFFFF_0000, 0xFFFF_FFFF_FFFF]
    assert near_duplicate_pairs(phash, dhash) == [(0, 1)]
    groups = duplicate_groups(["a", "b", "c", "d"], phash=phash, dhash=dhash)
    assert groups[0] == groups[1] and len(set(groups.tolist())) == 3


def test_grouped_folds_never_split_a_group_and_balance_classes():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(6), 25)
    groups = np.arange(len(labels))
    for _ in range(40):  # sprinkle duplicate groups of 2-4 images within a class
        cls = rng.integers(6)
        members = rng.choice(np.flatnonzero(labels == cls), rng.integers(2, 5), replace=False)
        groups[members] = groups[members[0]]
    folds = grouped_folds(labels, groups, k=5, seed=7)
    for group in np.unique(groups):
        assert len(set(folds[groups == group].tolist())) == 1
    per_class = np.array([[np.sum((folds == f) & (labels == c)) for c in range(6)] for f in range(5)])
    assert per_class.max() - per_class.min() <= 4
    assert np.array_equal(folds, grouped_folds(labels, groups, k=5, seed=7))
    assert not np.array_equal(folds, grouped_folds(labels, groups, k=5, seed=8))


def test_grouped_folds_refuses_fewer_groups_than_folds():
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        grouped_folds([0, 0, 1, 1], [0, 0, 1, 1], k=5, seed=0)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data set not present")
def test_eggshell_repeats_in_the_shared_data_form_five_groups():
    """Class 03_02 is five photos re-encoded ~20 times each: five groups, each kept in one fold."""
    refs = list_split(DATA, "train")
    eggshell = [ref for ref in refs if ref.code == "03_02"]
    rgbs = [load_rgb(ref.path) for ref in eggshell]
    hashes = [perceptual_hashes(rgb) for rgb in rgbs]
    groups = duplicate_groups([ref.key for ref in eggshell], phash=[h[0] for h in hashes], dhash=[h[1] for h in hashes])
    assert len(set(groups.tolist())) == 5
    folds = grouped_folds(np.zeros(len(groups), int), groups, k=5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == sorted(np.bincount(groups).tolist())


# --------------------------------------------------------------------------- training


def test_options_are_validated_with_the_option_name():
    with pytest.raises(EdgeBuildError, match="--lr-schedule"):
        TrainOptions(lr_schedule="linear").validate()
    with pytest.raises(EdgeBuildError, match="--warmup-epochs"):
        TrainOptions(epochs=3, warmup_epochs=4).validate()
    assert TrainOptions().weight_decay < 1  # not the course's 3.0


def test_fit_head_is_deterministic_bit_for_bit_and_learns():
    features, labels = synthetic(per_class=8)
    options = TrainOptions(epochs=4, lr=0.03, seed=5)
    first = fit_head(features, labels, options)
    second = fit_head(features, labels, options)
    assert first["weight"].tobytes() == second["weight"].tobytes()
    assert first["bias"].tobytes() == second["bias"].tobytes()
    assert first["epoch_loss"] == second["epoch_loss"]
    other_seed = fit_head(features, labels, replace(options, seed=6))
    assert other_seed["weight"].tobytes() != first["weight"].tobytes()
    accuracy = ((features @ first["weight"].T + first["bias"]).argmax(1) == labels).mean()
    assert accuracy > 0.95
    assert first["epoch_loss"][-1] < first["epoch_loss"][0] / 3
    steps = training.steps_per_epoch(len(labels), options.batch_size) * options.epochs
    assert len(first["learning_rates"]) == steps


def test_vectorized_cv_engine_matches_fit_head_per_fold():
    features, labels = synthetic(per_class=10)
    rng = np.random.default_rng(0)
    # 200 and 190 samples: 7 and 6 steps per epoch, so the engine runs two groups.
    subsets = [np.sort(rng.choice(len(labels), size, replace=False)) for size in (200, 190)]
    base = TrainOptions(epochs=3, lr_schedule="square", warmup_epochs=1, seed=2)
    configs = [replace(base, lr=0.05, weight_decay=0.02), replace(base, lr=0.01, weight_decay=0.0)]
    weights, biases = training._train_many(features, labels, subsets, configs)
    for f, subset in enumerate(subsets):
        for c, config in enumerate(configs):
            reference = fit_head(features[subset], labels[subset], config)
            np.testing.assert_allclose(weights[f, c], reference["weight"], atol=2e-5)
            np.testing.assert_allclose(biases[f, c], reference["bias"], atol=2e-5)


def test_cross_validation_reports_a_table_and_picks_from_the_grid(monkeypatch):
    monkeypatch.setattr(training, "SEARCH_LR", (0.003, 0.03))
    monkeypatch.setattr(training, "SEARCH_WEIGHT_DECAY", (1e-3, 1.0))
    monkeypatch.setattr(training, "SEARCH_EPOCHS", (2, 3))
    features, labels = synthetic(per_class=10, seed=1)
    sha = [f"{i:064x}" for i in range(len(labels))]
    sha[1] = sha[0]  # an exact duplicate pair must land in one fold
    given = TrainOptions(folds=4, lr=0.001, weight_decay=1.0, epochs=2)  # a poor recipe, not in the grid
    record, chosen = cross_validate(feature_set(features, labels, sha), given, log=lambda m: None)
    assert len(record["table"]) == 9  # 8 grid points + the given recipe
    assert record["duplicate_groups"] == len(labels) - 1
    assert sum(record["fold_sizes"]) == len(labels)
    best = record["table"][0]
    assert best == record["best_row"] and best["weight_decay"] == 1e-3  # weight decay 1.0 underfits: CV sees it
    assert not record["comparison"]["kept_given_recipe"]
    assert (chosen.lr, chosen.weight_decay, chosen.epochs) == (best["lr"], best["weight_decay"], best["epochs"])
    again, _ = cross_validate(feature_set(features, labels, sha), given, log=lambda m: None)
    assert [r["cv_accuracy"] for r in again["table"]] == [r["cv_accuracy"] for r in record["table"]]


def _row(lr, folds):
    return {
        "lr": lr,
        "weight_decay": 0.01,
        "epochs": 20,
        "cv_accuracy": float(np.mean(folds)),
        "cv_nll": 0.3,
        "fold_accuracy": folds,
    }


def test_the_given_recipe_is_kept_unless_beaten_beyond_noise():
    given = TrainOptions(lr=0.03)
    noisy = [_row(0.03, [0.95, 0.91, 0.92, 0.90, 0.96]), _row(0.1, [0.96, 0.91, 0.93, 0.89, 0.96])]
    best, chosen, comparison = training.choose(noisy, given, fold_sizes=[440] * 5)
    assert best["lr"] == 0.1 and chosen["lr"] == 0.03 and comparison["kept_given_recipe"]
    clear = [_row(0.03, [0.95, 0.91, 0.92, 0.90, 0.96]), _row(0.1, [0.97, 0.93, 0.93, 0.92, 0.97])]
    best, chosen, comparison = training.choose(clear, given, fold_sizes=[440] * 5)
    assert chosen["lr"] == 0.1 and not comparison["kept_given_recipe"]
    assert comparison["best_minus_given"] == pytest.approx(0.016)


# --------------------------------------------------------------------------- the stage (real weights)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not TF1.is_file():
        pytest.skip("shared weights not present")
    from edge_build.weights import import_weights

    return import_weights(TF1, tmp_path_factory.mktemp("weights-build"))


class _StoredFeatures(FeatureSet):
    def content_hash(self, split: str) -> str:
        return "f" * 64


@pytest.mark.slow
def test_train_stage_writes_checkpoints_and_record_and_is_cached(imported, tmp_path):
    from edge_build import stages
    from edge_build.trained import load_trained

    features, labels = synthetic(per_class=6)
    base = feature_set(features, labels)
    fs = _StoredFeatures(base.splits, base.runtime, base.key, base.directory)
    options = TrainOptions(epochs=2)
    first = training.train_head(fs, imported, tmp_path / "a", options, progress=False)
    assert first.ran and first.head_checkpoint.is_file() and first.network_checkpoint.is_file()
    record = json.loads((first.directory / "training.json").read_text())
    assert len(record["history"]["epoch_loss"]) == 2
    assert len(record["learning_rate"]["per_step"]) == 2 * record["learning_rate"]["steps_per_epoch"]
    assert record["hyperparameters"]["weight_decay"] == options.weight_decay
    assert record["inputs"]["weights_sha256"] == imported.sha256
    for plot in ("loss.png", "lr_schedules.png"):
        assert (first.directory / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = len(stages.EXECUTIONS)
    assert not training.train_head(fs, imported, tmp_path / "a", options, progress=False).ran
    assert len(stages.EXECUTIONS) == runs
    assert training.train_head(fs, imported, tmp_path / "a", replace(options, seed=1), progress=False).ran

    # Same inputs, another build directory: the same head, bit for bit.
    again = training.train_head(fs, imported, tmp_path / "b", replace(options, seed=1), progress=False)
    heads = [load_trained(tmp_path / d) for d in ("a", "b")]
    from edge_build import network

    arrays = []
    for model in heads:
        head = network.build_head(26)
        network.load_checkpoint(head, model.head_checkpoint)
        arrays.append(head.weight.asnumpy().tobytes() + head.bias.asnumpy().tobytes())
    assert again.ran and arrays[0] == arrays[1]

    # The network checkpoint holds the backbone (BatchNorm form) and the trained head.
    net = heads[0].network(fold_bn=True)
    assert tuple(net.head.weight.shape) == (26, 1280)


def test_cv_folds_keep_a_mirrored_copy_with_its_original():
    from edge_build.features import SplitFeatures
    from edge_build.training import TrainOptions, cv_folds

    rng = np.random.default_rng(3)
    n = 60
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    dhash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    train = SplitFeatures(
        split="train",
        features=rng.normal(size=(n, 4)).astype(np.float32),
        labels=np.arange(n) % 3,
        keys=[f"train/00_0{i % 3}/{i:05d}.jpg" for i in range(n)],
        sha256=[f"{i:064x}" for i in range(n)],
        pixel_sha256=[f"{i + 1000:064x}" for i in range(n)],
        phash=phash,
        dhash=dhash,
    )
    flipped_p = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    flipped_d = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    flipped_p[7], flipped_d[7] = phash[40], dhash[40]  # image 7 mirrored is image 40
    options = TrainOptions(folds=5)
    plain_groups, _, _ = cv_folds(train, options)
    groups, _, held_out = cv_folds(train, options, (flipped_p, flipped_d))
    assert plain_groups[7] != plain_groups[40] and groups[7] == groups[40]
    fold_of = {int(i): f for f, held in enumerate(held_out) for i in held}
    assert fold_of[7] == fold_of[40]
