"""Calibration list: reproducible, training split only, hashes enforced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from quant_fixtures import make_colour_dataset

from edge_build.calibration import (
    calibration_file,
    ensure_calibration,
    generate_calibration,
    load_calibration,
    write_calibration,
)
from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing
from edge_build.taxonomy import CODES

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "garbage_26x100"
COMMITTED = REPO / "calibration" / "garbage_26x100.json"


@pytest.fixture
def colour_data(tmp_path):
    return make_colour_dataset(tmp_path / "data", train_per_class=4, val_per_class=1)


def test_generation_is_reproducible_stratified_and_train_only(colour_data):
    first = generate_calibration(colour_data, per_class=3, seed=7)
    assert first == generate_calibration(colour_data, per_class=3, seed=7)
    assert first["images"] != generate_calibration(colour_data, per_class=3, seed=8)["images"]
    assert first["count"] == 26 * 3 and first["short_classes"] == {}
    assert {entry["split"] for entry in first["images"]} == {"train"}
    per_class = {code: sum(e["class"] == code for e in first["images"]) for code in CODES}
    assert set(per_class.values()) == {3}


def test_undecodable_duplicate_and_validation_copies_are_passed_over(colour_data):
    folder = colour_data / "train" / "00_00"
    (folder / "broken.png").write_bytes(b"not a png")
    shutil.copyfile(folder / "train_00.png", folder / "copy_of_00.png")
    shutil.copyfile(colour_data / "val" / "00_01" / "val_00.png", colour_data / "train" / "00_01" / "leak.png")
    listing = generate_calibration(colour_data, per_class=10, seed=0)
    files_00 = [e["file"] for e in listing["images"] if e["class"] == "00_00"]
    assert "broken.png" not in files_00
    assert not {"train_00.png", "copy_of_00.png"} <= set(files_00)  # one of the two identical files only
    assert len(files_00) == 4
    assert "leak.png" not in [e["file"] for e in listing["images"] if e["class"] == "00_01"]
    assert listing["short_classes"]["00_00"] == 4


def test_changed_image_is_refused_naming_it(colour_data, tmp_path):
    path = write_calibration(tmp_path / "cal.json", generate_calibration(colour_data, per_class=2))
    calibration = load_calibration(path, colour_data)
    assert len(calibration) == 52 and all(ref.split == "train" for ref in calibration.refs)
    victim = calibration.refs[5]
    victim.path.write_bytes(victim.path.read_bytes() + b"\0")
    with pytest.raises(EdgeBuildError) as info:
        load_calibration(path, colour_data)
    message = str(info.value)
    assert victim.key in message and "changed since the list was made" in message
    assert "edge-build calibrate" in message


def test_first_mismatch_is_the_one_named(colour_data, tmp_path):
    path = write_calibration(tmp_path / "cal.json", generate_calibration(colour_data, per_class=2))
    refs = load_calibration(path, colour_data).refs
    refs[9].path.unlink()
    refs[3].path.write_bytes(b"changed")
    with pytest.raises(EdgeBuildError, match=refs[3].key):
        load_calibration(path, colour_data)
    refs[3].path.unlink()
    with pytest.raises(EdgeBuildError, match=f"{refs[3].key} is listed but missing"):
        load_calibration(path, colour_data)


def test_validation_entry_and_bad_files_are_refused(colour_data, tmp_path):
    listing = generate_calibration(colour_data, per_class=1)
    listing["images"][0] = {**listing["images"][0], "split": "val"}
    path = write_calibration(tmp_path / "cal.json", listing)
    with pytest.raises(EdgeBuildError, match="never validation"):
        load_calibration(path, colour_data)
    (tmp_path / "junk.json").write_text("{nope")
    with pytest.raises(EdgeBuildError, match=r"junk\.json: unreadable"):
        load_calibration(tmp_path / "junk.json", colour_data)
    with pytest.raises(EdgeBuildError, match="edge-build calibrate"):
        load_calibration(tmp_path / "absent.json", colour_data)


def test_ensure_writes_a_missing_list_once_and_batches_use_shared_preprocessing(colour_data, tmp_path):
    messages = []
    calibration = ensure_calibration(tmp_path / "calibration", colour_data, log=messages.append)
    path = calibration_file(tmp_path / "calibration", colour_data)
    assert path.name == "data.json" and path.is_file() and len(messages) == 1
    stamp = path.stat().st_mtime_ns
    again = ensure_calibration(tmp_path / "calibration", colour_data, log=messages.append)
    assert path.stat().st_mtime_ns == stamp and len(messages) == 1
    assert again.fingerprint == calibration.fingerprint
    preprocessing = Preprocessing(size=16)
    batch = next(calibration.batches(preprocessing, batch_size=4))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype.name == "float32"
    assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0


def test_calibrate_command_writes_the_list(colour_data, tmp_path):
    from edge_build.cli import main

    out = tmp_path / "calibration"
    result = CliRunner().invoke(
        main, ["calibrate", "--per-class", "2", "--data", str(colour_data), "--calibration", str(out)]
    )
    assert result.exit_code == 0, result.output
    listing = json.loads((out / "data.json").read_text())
    assert listing["count"] == 52 and listing["per_class"] == 2


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data set not present")
def test_committed_list_matches_the_shared_data_and_regenerates_identically():
    calibration = load_calibration(COMMITTED, SHARED_DATA)
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert generate_calibration(SHARED_DATA, committed["per_class"], committed["seed"]) == committed
    assert all(ref.split == "train" for ref in calibration.refs)
    classes = {ref.code for ref in calibration.refs}
    # 03_02 (eggshell): every training image is a byte copy of a validation image, so none is usable.
    assert committed["short_classes"] == {"03_02": 0} and classes == set(CODES) - {"03_02"}
    assert len(calibration) == 250
