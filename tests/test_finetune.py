"""Fine-tuning: the intermediate cache (content addressing, invalidation, atomicity), duplicate-aware folds,
the trainable tail (parity with the network, reproducibility), the BN-form checkpoint and the stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_build import network, taxonomy
from edge_build.augment import Augmentation
from edge_build.cli.finetune import parse_blocks, pop_finetune
from edge_build.dataset import list_split
from edge_build.errors import EdgeBuildError
from edge_build.feature_maps import MapStore, frozen_maps, map_shape, view_tag
from edge_build.finetune import FinetuneOptions, search_grid
from edge_build.folds import duplicate_groups, grouped_folds
from edge_build.hashing import sha256_file
from edge_build.tail import fit_tail, initial_values, tail_logits

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TF1 = SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite"


# --------------------------------------------------------------------------- options and shapes


def test_options_validate_and_name_the_first_trainable_stage():
    assert FinetuneOptions(blocks=2).start == 17
    assert FinetuneOptions(blocks=0).start == 19 and FinetuneOptions(blocks=19).start == 0
    for bad in ({"blocks": 20}, {"lr": 0}, {"epochs": 0}, {"views": 0}, {"warmup": 1.0}, {"lr_schedule": "step"}):
        with pytest.raises(EdgeBuildError, match="invalid fine-tuning option"):
            FinetuneOptions(**bad).validate()


def test_map_shapes_follow_the_architecture():
    assert map_shape(1) == (32, 112, 112)
    assert map_shape(14) == (96, 14, 14)
    assert map_shape(17) == (160, 7, 7)
    assert map_shape(18) == (320, 7, 7)
    assert map_shape(19) == (1280, 7, 7)
    assert map_shape(0) == (3, 224, 224)  # --blocks all: the preprocessed view
    with pytest.raises(EdgeBuildError):
        map_shape(20)


def test_blocks_option_and_finetune_flags():
    assert parse_blocks("all") == 19 and parse_blocks("3") == 3 and parse_blocks(None) is None
    with pytest.raises(EdgeBuildError, match="--blocks"):
        parse_blocks("top")
    kwargs = {"finetune": True, "blocks": "1", "views": None, "finetune_lr": 0.02, "finetune_epochs": None, "cv": False}
    assert pop_finetune(kwargs) == {"blocks": 1, "views": None, "lr": 0.02, "epochs": None, "cv": False}
    assert kwargs == {}
    with pytest.raises(EdgeBuildError, match="without --finetune"):
        pop_finetune({"finetune": False, "blocks": "2", "cv": True})
    assert pop_finetune({"finetune": False, "cv": True}) is None


def test_search_grid_varies_only_the_searched_knobs():
    grid = search_grid(FinetuneOptions(seed=3, batch_size=16))
    assert len(grid) >= 6 and len({(g.blocks, g.lr, g.epochs, g.views) for g in grid}) == len(grid)
    assert {g.seed for g in grid} == {3} and {g.batch_size for g in grid} == {16}
    assert [g.blocks for g in grid].count(0) == 1  # head only competes, once


# --------------------------------------------------------------------------- the cache store


def test_view_tags_name_content_not_position():
    aug = Augmentation()
    assert view_tag(0, 0, aug) == view_tag(0, 5, replace(aug, flip=0.0)) == "0"  # the original image
    assert view_tag(1, 0, aug) != view_tag(2, 0, aug)
    assert view_tag(1, 0, aug) != view_tag(1, 1, aug)
    assert view_tag(1, 0, aug) != view_tag(1, 0, replace(aug, brightness=0.1))
    assert view_tag(1, 0, aug) == view_tag(1, 0, Augmentation())


def test_map_store_round_trip_names_shards_by_content(tmp_path):
    store = MapStore(tmp_path / "maps")
    rng = np.random.default_rng(0)
    entries = {f"{i:064x}:0": rng.normal(size=(4, 2, 2)).astype(np.float16) for i in range(3)}
    shard = store.write(entries)
    assert shard.stem == sha256_file(shard)
    loaded = MapStore(tmp_path / "maps").load()
    assert sorted(loaded) == sorted(entries)
    for name, value in entries.items():
        assert loaded[name].dtype == np.float16 and np.array_equal(loaded[name], value)


def test_damaged_shard_is_detected_removed_and_reported(tmp_path):
    store = MapStore(tmp_path / "maps")
    good = store.write({"a" * 64 + ":0": np.ones((2, 1, 1), np.float16)})
    bad = store.write({"b" * 64 + ":0": np.zeros((2, 1, 1), np.float16)})
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF  # a torn or flipped write: the content no longer matches the name
    bad.write_bytes(bytes(data))
    (tmp_path / "maps" / ".x.npz.abc.tmp").write_bytes(b"partial")  # a writer killed mid-write
    reader = MapStore(tmp_path / "maps")
    loaded = reader.load()
    assert list(loaded) == ["a" * 64 + ":0"]
    assert len(reader.damaged) == 1 and bad.name in reader.damaged[0]
    assert not bad.exists() and good.exists()
    reader.compact(loaded)
    assert [p.name for p in (tmp_path / "maps").iterdir()] == [good.name]  # the temp file is gone too


# --------------------------------------------------------------------------- duplicate-aware folds


def test_no_duplicate_or_near_duplicate_group_is_split_across_folds():
    rng = np.random.default_rng(5)
    n = 300
    labels = np.repeat(np.arange(10), 30)
    files = [f"f{i}" for i in range(n)]
    pixels = [f"p{i}" for i in range(n)]
    phash = rng.integers(0, 2**63, n, dtype=np.uint64)
    dhash = rng.integers(0, 2**63, n, dtype=np.uint64)
    for i in range(0, n, 10):  # exact copies
        files[i + 1] = files[i]
    for i in range(2, n, 10):  # re-encodings: same pixels
        pixels[i + 1] = pixels[i]
    for i in range(4, n, 10):  # near-duplicates: hashes 2 bits apart
        phash[i + 1] = phash[i] ^ np.uint64(0b101)
        dhash[i + 1] = dhash[i] ^ np.uint64(0b11)
    groups = duplicate_groups(files, pixels, phash=phash, dhash=dhash)
    for seed in range(3):
        folds = grouped_folds(labels, groups, k=5, seed=seed)
        for group in np.unique(groups):
            assert len(set(folds[groups == group].tolist())) == 1
        for first in (0, 2, 4):
            assert all(folds[i] == folds[i + 1] for i in range(first, n, 10))
        assert np.bincount(folds).min() >= 50


def test_mirrored_copies_are_grouped_like_near_duplicates():
    from edge_build.folds import mirrored_hashes, mirrored_pairs, perceptual_hashes

    rng = np.random.default_rng(3)
    base = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # blocky, asymmetric
    other = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    images = [base, np.ascontiguousarray(base[:, ::-1]), other]
    own = [perceptual_hashes(rgb) for rgb in images]
    mirrored = [mirrored_hashes(rgb) for rgb in images]
    phash, dhash = [h[0] for h in own], [h[1] for h in own]
    assert mirrored_pairs(phash, dhash, [h[0] for h in mirrored], [h[1] for h in mirrored]) == [(0, 1)]
    keys = ["a", "b", "c"]
    assert len(set(duplicate_groups(keys, phash=phash, dhash=dhash).tolist())) == 3  # the images' own hashes miss it
    groups = duplicate_groups(
        keys, phash=phash, dhash=dhash, mirrored_phash=[h[0] for h in mirrored], mirrored_dhash=[h[1] for h in mirrored]
    )
    assert groups[0] == groups[1] != groups[2]


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="shared data set not present")
def test_the_shared_training_split_has_mirrored_copies():
    from edge_build.folds import mirrored_hashes, mirrored_pairs, perceptual_hashes
    from edge_build.images import load_rgb

    folder = SHARED / "data" / "garbage_26x100" / "train" / "00_00"
    rgbs = [load_rgb(folder / name) for name in ("00033.jpg", "00034.jpg", "00001.jpg")]
    own = [perceptual_hashes(rgb) for rgb in rgbs]
    mirrored = [mirrored_hashes(rgb) for rgb in rgbs]
    pairs = mirrored_pairs([h[0] for h in own], [h[1] for h in own], [h[0] for h in mirrored], [h[1] for h in mirrored])
    assert pairs == [(0, 1)]


# --------------------------------------------------------------------------- MindSpore: tail and cache


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not TF1.is_file():
        pytest.skip("shared weights not present")
    from edge_build.weights import import_weights

    return import_weights(TF1, tmp_path_factory.mktemp("weights-build"))


def _random_head(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.05, (26, 1280)).astype(np.float32), rng.normal(0, 0.1, 26).astype(np.float32)


@pytest.mark.slow
def test_tail_at_its_initial_values_is_the_network(imported):
    """Cached map -> tail gives what the whole network gives on the image."""
    from edge_build.feature_maps import frozen_cell

    ms = network._cells().ms
    rng = np.random.default_rng(0)
    images = imported.preprocessing.normalize(rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    weight, bias = _random_head()
    folded = imported.load_backbone(fold_bn=True)
    head = network.build_head(26)
    head.weight.set_data(ms.Tensor(weight))
    head.bias.set_data(ms.Tensor(bias))
    expected = network.build_classifier(folded, head)(ms.Tensor(images)).asnumpy()
    for start in (17, 18):
        maps = frozen_cell(imported, start)(ms.Tensor(images)).asnumpy()
        got = tail_logits(maps, initial_values(folded, start, weight, bias), imported.padding, start)
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_fit_tail_is_reproducible_from_the_seed_and_learns(imported):
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 2, (16, 2, 320, 7, 7)).astype(np.float16)
    labels = np.arange(16) % 4
    weight, bias = _random_head()
    initial = initial_values(imported.load_backbone(fold_bn=True), 18, weight, bias)
    options = FinetuneOptions(blocks=1, lr=0.05, epochs=3, views=2, batch_size=8, seed=4)
    runs = [fit_tail(maps, labels, initial, imported.padding, o) for o in (options, options, replace(options, seed=5))]
    names = sorted(runs[0]["values"])
    assert "backbone.stages.18.conv.weight" in names and "head.weight" in names
    assert all(np.array_equal(runs[0]["values"][n], runs[1]["values"][n]) for n in names)
    assert not np.array_equal(runs[0]["values"]["head.weight"], runs[2]["values"]["head.weight"])
    assert runs[0]["steps_per_epoch"] == 16 * 2 // 8 and len(runs[0]["learning_rates"]) == 3 * 4
    assert runs[0]["epoch_loss"][-1] < runs[0]["epoch_loss"][0]
    assert not np.array_equal(
        runs[0]["values"]["backbone.stages.18.conv.weight"], initial["backbone.stages.18.conv.weight"]
    )


@pytest.mark.slow
def test_trained_tail_saved_in_bn_form_folds_back_exactly(imported, tmp_path):
    from edge_build.tail import bn_form_classifier

    rng = np.random.default_rng(2)
    weight, bias = _random_head()
    values = initial_values(imported.load_backbone(fold_bn=True), 17, weight, bias)
    values = {name: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for name, v in values.items()}
    classifier = bn_form_classifier(imported, values)
    network.save_checkpoint(classifier, tmp_path / "network.ckpt")
    reloaded = network.build_classifier(network.build_backbone(imported.padding), network.build_head(26))
    network.load_checkpoint(reloaded, tmp_path / "network.ckpt")
    folded = network.fold_batchnorm(reloaded)
    params = {p.name: p.asnumpy() for p in folded.get_parameters()}
    for name, value in values.items():
        assert np.array_equal(params[name], value), name
    untouched = {p.name: p.asnumpy() for p in imported.load_backbone(fold_bn=True).stages[5].get_parameters()}
    assert all(np.array_equal(params[name], value) for name, value in untouched.items())


def _photo_tree(root: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        code = taxonomy.CODES[i % len(taxonomy.CODES)]
        path = root / "train" / code / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def _items(root: Path) -> list:
    return [(ref, sha256_file(ref.path)) for ref in list_split(root, "train")]


@pytest.mark.slow
def test_frozen_map_cache_computes_only_what_changed(imported, tmp_path):
    root, build = tmp_path / "data", tmp_path / "build"
    paths = _photo_tree(root, 3)
    aug = Augmentation()

    def maps(views: int, seed: int = 0, items: list | None = None):
        return frozen_maps(items or _items(root), imported, build, 18, views, seed, aug, "mindspore", False)

    first = maps(2)
    assert first.maps.shape == (3, 2, 320, 7, 7) and first.maps.dtype == np.float16
    assert first.info["computed_views"] == 6
    again = maps(2)
    assert again.info["computed_views"] == 0 and np.array_equal(again.maps, first.maps)
    more = maps(3)  # one more view per image: only those are computed, the first two are reused
    assert more.info["computed_views"] == 3 and np.array_equal(more.maps[:, :2], first.maps)
    reseeded = maps(2, seed=1)  # another seed: new augmented views, the original (view 0) reused
    assert reseeded.info["computed_views"] == 3
    assert np.array_equal(reseeded.maps[:, 0], first.maps[:, 0]) and not np.array_equal(
        reseeded.maps[:, 1], first.maps[:, 1]
    )
    # change one image's pixels: only its views are computed
    Image.fromarray(np.zeros((48, 64, 3), np.uint8), "RGB").save(paths[1])
    changed = maps(2)
    assert changed.info["computed_views"] == 2
    assert np.array_equal(changed.maps[[0, 2]], first.maps[[0, 2]]) and not np.array_equal(
        changed.maps[1], first.maps[1]
    )
    # the view 0 map is the frozen part of the plain preprocessed image
    from edge_build.feature_maps import frozen_cell

    ms = network._cells().ms
    plain = frozen_cell(imported, 18)(ms.Tensor(imported.preprocessing.prepare_batch([paths[0]]))).asnumpy()
    np.testing.assert_allclose(first.maps[0, 0].astype(np.float32), plain[0], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_frozen_map_cache_survives_a_damaged_shard_and_is_reproducible(imported, tmp_path):
    root = tmp_path / "data"
    _photo_tree(root, 2)
    aug = Augmentation()
    first = frozen_maps(_items(root), imported, tmp_path / "a", 18, 2, 0, aug, "mindspore", False)
    other = frozen_maps(_items(root), imported, tmp_path / "b", 18, 2, 0, aug, "mindspore", False)
    assert np.array_equal(first.maps, other.maps)  # same seed, another build directory: the same views
    shard = next(Path(first.info["directory"]).glob("*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    warnings: list[str] = []
    healed = frozen_maps(_items(root), imported, tmp_path / "a", 18, 2, 0, aug, "mindspore", False, warnings.append)
    assert healed.info["computed_views"] == 4 and len(healed.info["damaged_shards"]) == 1
    assert any("damaged" in w for w in warnings)
    assert np.array_equal(healed.maps, first.maps)


def _class_tree(root: Path, train_per_class: int, val_per_class: int) -> None:
    """Images whose class is a colour: learnable in a few steps, different enough to need no duplicates."""
    rng = np.random.default_rng(7)
    for c, code in enumerate(taxonomy.CODES):
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 153) % 256], np.float32)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for i in range(count):
                noise = rng.normal(0, 25, (40, 40, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                path = root / split / code / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, "RGB").save(path)


@pytest.mark.slow
def test_finetune_stage_writes_what_later_stages_read_and_is_cached(imported, tmp_path):
    from edge_build import stages
    from edge_build.features import extract_features
    from edge_build.finetune import finetune_stage
    from edge_build.trained import load_trained
    from edge_build.training import TrainOptions, train_head

    root, build = tmp_path / "data", tmp_path / "build"
    _class_tree(root, train_per_class=3, val_per_class=1)
    features = extract_features(root, imported, build, progress=False, runtime="mindspore")
    head_options = TrainOptions(epochs=3, folds=2)
    options = FinetuneOptions(blocks=1, epochs=1, views=2, batch_size=16)

    def run(**overrides):
        settings = {"folds": 2, "runtime": "mindspore", "progress": False, **overrides}
        return finetune_stage(
            data_root=root,
            weights=imported,
            features=features,
            build_dir=build,
            head_options=head_options,
            options=options,
            **settings,
        )

    result = run()
    assert result.ran and result.info["trained"]
    record = json.loads((build / "train" / "training.json").read_text())
    tuned = record["finetune"]
    assert tuned["blocks"] == 1 and tuned["trainable"] == ["stages.18", "head"]
    assert tuned["recipe"]["views"] == 2 and tuned["folds"] == 2
    for side in (tuned, tuned["head_only"]):
        assert side["cv"]["n"] == 78 and side["cv"]["low"] <= side["cv"]["accuracy"] <= side["cv"]["high"]
        assert side["validation"]["n"] == 26
        photo = side["cv_per_photo"]
        assert photo["n"] == tuned["duplicate_groups"] and photo["low"] <= photo["accuracy"] <= photo["high"]
        wrong = side["cv"]["n"] - side["cv"]["correct"]
        assert sum(row["errors"] for row in side["cv_errors_by_class"]) <= wrong
    assert tuned["network_check"]["top1_agreement"] == 1.0
    assert sorted(p.name for p in (build / "train").iterdir()) == sorted(
        ["head.ckpt", "network.ckpt", "training.json", "loss.png", "lr_schedules.png", "record.json"]
    )

    # later stages read it through load_trained: the network is the fine-tuned one
    model = load_trained(build)
    assert "fine-tuned" in model.summary()["architecture"]
    trained_final = network.build_backbone(imported.padding)
    network.load_checkpoint(trained_final, model.checkpoint)
    changed = trained_final.stages[18].conv.weight.asnumpy()
    original = imported.load_backbone().stages[18].conv.weight.asnumpy()
    assert not np.array_equal(changed, original)
    assert np.array_equal(
        trained_final.stages[17].project.conv.weight.asnumpy(),
        imported.load_backbone().stages[17].project.conv.weight.asnumpy(),
    )
    val = features["val"]
    logits = model.network(fold_bn=True)(
        network._cells().ms.Tensor(imported.preprocessing.prepare_batch([root / key for key in val.keys]))
    ).asnumpy()
    assert (logits.argmax(1) == val.labels).mean() == tuned["validation"]["accuracy"]

    # unchanged inputs: nothing runs; head-only training and back: the fine-tune run is reused
    runs = len(stages.EXECUTIONS)
    again = run()
    assert not again.info["trained"] and len(stages.EXECUTIONS) == runs
    train_head(features, imported, build, head_options, progress=False)
    assert "finetune" not in json.loads((build / "train" / "training.json").read_text())
    back = run()
    assert not back.info["trained"] and back.info["published"]
    assert json.loads((build / "train" / "training.json").read_text())["finetune"]["blocks"] == 1

    # --blocks 0 --no-cv: the head-only network through the same path, validation figures only
    head_only = run(blocks=0, cv=False).record["finetune"]
    assert head_only["blocks"] == 0 and head_only["trainable"] == ["head"] and head_only["cv"] is None
    assert head_only["validation"] == head_only["head_only"]["validation"]
