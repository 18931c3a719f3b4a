"""`edge-build doctor`: the real defects of the shared data set, and each check on generated data.

The shared data set's numbers below were computed independently of edge-build, with
`find train val -name '*.jpg' -print0 | xargs -0 sha256sum` and awk/sort/uniq.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from doctor_fixtures import make_dataset, run_doctor_cli, smooth_image
from PIL import Image

from edge_build.doctor import SCHEMA, can_fork, run_doctor
from edge_build.doctor_render import render_text
from edge_build.taxonomy import CODES

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "garbage_26x100"

#: distinct contents (different sha256) among the training files of each class
TRAIN_DISTINCT = {
    "00_00": 84, "00_01": 83, "00_02": 83, "00_03": 80, "00_04": 82, "00_05": 83, "00_06": 84,
    "00_07": 81, "00_08": 84, "00_09": 84, "01_00": 84, "01_01": 84, "01_02": 84, "01_03": 83,
    "01_04": 84, "01_05": 82, "01_06": 83, "01_07": 84, "02_00": 83, "02_01": 84, "02_02": 81,
    "02_03": 77, "03_00": 83, "03_01": 84, "03_02": 5, "03_03": 82,
}  # fmt: skip
TRAIN_FILES = {code: 84 for code in CODES} | {"02_03": 77, "03_02": 99}
#: validation files byte-identical to at least one training file
LEAKED_VAL = [
    "val/00_01/00040.jpg",
    "val/01_00/00048.jpg",
    "val/03_02/00032.jpg",
    "val/03_02/00046.jpg",
    "val/03_02/00061.jpg",
    "val/03_02/00071.jpg",
    "val/03_02/00079.jpg",
]


@pytest.fixture(scope="module")
def shared():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data set not present at {SHARED_DATA}")
    return run_doctor(SHARED_DATA, workers=2)


def test_shared_counts_files_and_distinct_images_per_class(shared):
    assert {code: c["files"] for code, c in shared.counts["train"].items()} == TRAIN_FILES
    assert {code: c["distinct"] for code, c in shared.counts["train"].items()} == TRAIN_DISTINCT
    assert all(c == {"files": 5, "usable": 5, "distinct": 5} for c in shared.counts["val"].values())
    assert shared.images["files"] == shared.images["usable"] == 2322
    assert shared.imbalance["train"]["distinct"] == {"min": 5, "max": 84, "median": 83}


def test_shared_eggshell_class_is_five_photos_copied_twenty_times(shared):
    finding = shared.finding("underrepresented_class")
    assert finding.paths == ["train/03_02"]
    assert "5 distinct images in 99 files" in finding.details[0]
    eggshell_groups = [g for g in shared.duplicates["groups"] if g["paths"][0].startswith("train/03_02/")]
    assert sorted(len(g["paths"]) for g in eggshell_groups) == [20, 21, 21, 21, 21]  # 19 or 20 train copies + 1 val


def test_shared_leakage_and_duplicates(shared):
    assert [item["path"] for item in shared.duplicates["leakage"]] == LEAKED_VAL
    assert shared.finding("leakage").paths == LEAKED_VAL and shared.finding("leakage").severity == "warning"
    assert shared.duplicates["label_conflicts"] == []  # no image is filed under two classes
    assert len(shared.duplicates["groups"]) == 28
    assert shared.duplicates["redundant_files"] == 2322 - 2198 == 124
    assert len(shared.finding("duplicate_in_class").paths) == 124 - len(LEAKED_VAL)


def test_shared_images_label_file_and_verdict(shared):
    assert shared.images["formats"] == {"JPEG": 2322}
    assert shared.images["modes"] == {"RGB": {"count": 2322, "pipeline": "used as is"}}
    assert shared.images["sizes"] == {"224x224": 2322} and shared.images["exif_rotated"] == []
    assert shared.label_file == {"path": "label.txt", "readable": True, "encoding": "gbk", "disagreements": []}
    assert shared.exit_code == 0 and shared.verdict == "warn"  # leakage warns: eval reports with/without it
    assert shared.errors == []


def test_shared_near_duplicates(shared):
    near = shared.near_duplicates
    # Pillow is pinned, so the decoded pixels and hence these counts are reproducible.
    assert near["counts"] == {"across_classes": 0, "across_splits": 13, "in_class": 83}
    pair = next(p for p in near["pairs"] if "val/00_01/00010.jpg" in p["a"] + p["b"])
    assert "train/00_01/00005.jpg" in pair["a"] + pair["b"] and pair["kind"] == "across_splits"
    assert pair["phash_distance"] == 0


def test_shared_under_20_seconds(shared):
    assert shared.workers == (2 if can_fork() else 1)
    assert shared.elapsed_s < 20


def test_shared_text_report(shared):
    text = render_text(shared)
    assert "03_02  eggshell" in text and "99 / 5 !" in text
    assert "7 non-training images byte-identical to a training image (leakage)" in text
    assert text.splitlines()[-1].startswith("verdict: WARN")


@pytest.mark.slow
def test_shared_cli_json(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data set not present")
    result = run_doctor_cli(SHARED_DATA, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["schema"] == SCHEMA and report["verdict"] == "warn"
    assert run_doctor_cli(SHARED_DATA, "--json", "--strict").exit_code == 1
    assert report["counts"]["train"]["03_02"] == {"files": 99, "usable": 99, "distinct": 5}


# --------------------------------------------------------------------------- generated data


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_json_is_data_first_with_relative_paths(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    (root / "train" / "00_00" / "copy.jpg").write_bytes((root / "train" / "00_00" / "000.jpg").read_bytes())
    result = run_doctor_cli(root, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert list(report)[:2] == ["schema", "tool"] and report["schema"] == SCHEMA
    assert report["summary"]["warning"] == {"findings": 1, "paths": 1}
    assert report["duplicates"]["groups"] == [
        {
            "sha256": report["duplicates"]["groups"][0]["sha256"],
            "paths": ["train/00_00/000.jpg", "train/00_00/copy.jpg"],
        }
    ]
    for finding in report["findings"]:
        assert set(finding) == {"severity", "code", "message", "hint", "count", "paths", "details"}
        assert all(not p.startswith("/") for p in finding["paths"])
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_strict_makes_warnings_fail(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    (root / "val" / "01_01" / "again.jpg").write_bytes((root / "val" / "01_01" / "000.jpg").read_bytes())
    assert run_doctor_cli(root).exit_code == 0
    strict = run_doctor_cli(root, "--strict")
    assert strict.exit_code == 1 and "--strict: warnings count as errors" in strict.output


def test_same_bytes_under_two_labels_and_across_splits(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    data = (root / "train" / "00_00" / "000.jpg").read_bytes()
    (root / "train" / "02_01" / "mislabelled.jpg").write_bytes(data)
    (root / "val" / "00_00" / "leak.jpg").write_bytes(data)
    report = run_doctor(root)
    assert report.finding("label_conflict").paths == [
        "train/00_00/000.jpg",
        "train/02_01/mislabelled.jpg",
        "val/00_00/leak.jpg",
    ]
    assert report.finding("leakage").paths == ["val/00_00/leak.jpg"]
    assert report.duplicates["label_conflicts"][0]["classes"] == ["00_00", "02_01"]
    assert report.exit_code == 1


def test_near_duplicates_are_reported_apart_from_exact_ones(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    original = Image.open(root / "train" / "03_00" / "000.jpg").convert("RGB")
    (root / "val" / "03_00" / "reencoded.jpg").write_bytes(_jpeg_bytes(original.resize((56, 56)), quality=60))
    (root / "train" / "03_01" / "same photo.jpg").write_bytes(_jpeg_bytes(original, quality=70))
    report = run_doctor(root)
    assert report.duplicates["groups"] == []
    kinds = {
        p["b"][0] if p["a"][0] == "train/03_00/000.jpg" else p["a"][0]: p["kind"]
        for p in report.near_duplicates["pairs"]
    }
    assert kinds["val/03_00/reencoded.jpg"] == "across_splits"
    assert kinds["train/03_01/same photo.jpg"] == "across_classes"
    assert report.finding("near_duplicate_across_classes").severity == "warning"


def test_modes_exif_and_sizes_say_what_the_pipeline_does(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    folder = root / "train" / "01_02"
    base = smooth_image(77, size=80)
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("RGBA").save(folder / "alpha.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    wide = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(wide).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth_image(78, size=120).crop((0, 0, 120, 60)).save(folder / "rotated.jpg", exif=exif.tobytes())
    smooth_image(79, size=16).save(folder / "tiny.png")
    report = run_doctor(root)
    modes = dict(zip(report.finding("non_rgb_mode").paths, report.finding("non_rgb_mode").details, strict=True))
    assert modes["train/01_02/gray.png"] == "mode L: grayscale: replicated to 3 channels"
    assert "transparency composited on white" in modes["train/01_02/palette.png"]
    assert "alpha composited on white" in modes["train/01_02/alpha.png"]
    assert "no ICC profile" in modes["train/01_02/cmyk.jpg"]
    assert "16-bit: scaled to 8 bits" in modes["train/01_02/sixteen.png"]
    assert report.images["exif_rotated"] == ["train/01_02/rotated.jpg"]
    assert report.images["sizes"]["120x60"] == 1 and report.images["width"] == {"min": 16, "max": 120}
    assert report.finding("small_image").paths == ["train/01_02/tiny.png"]
    assert report.exit_code == 0  # handled, so notes and a warning only


def test_label_file_utf8_gbk_and_unreadable(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=1)
    shared_label = SHARED_DATA / "label.txt"
    if shared_label.is_file():
        (root / "label.txt").write_bytes(shared_label.read_bytes())
        assert run_doctor(root).label_file["encoding"] == "gbk"
    text = "\n".join(f"x{code}: {code}" if code == "01_01" else f"{name}: {code}" for code, name in _names())
    (root / "label.txt").write_text(text, encoding="utf-8")
    report = run_doctor(root)
    assert report.label_file["encoding"] == "utf-8"
    assert report.finding("label_file_disagrees").details == ["class 01_01 is 'x01_01' in label.txt, '打火机' built in"]
    (root / "label.txt").write_bytes(b"\xff\xfe\x00garbage\xff")
    assert report.exit_code == 0
    assert run_doctor(root).finding("label_file_unreadable").paths == ["label.txt"]


def _names() -> list[tuple[str, str]]:
    from edge_build.taxonomy import BY_CODE

    return [(code, BY_CODE[code].chinese) for code in CODES]


def test_process_pool_and_inline_agree(tmp_path):
    root = make_dataset(tmp_path / "d", per_class=4)  # 208 images: over the in-process limit
    pooled, inline = run_doctor(root, workers=2), run_doctor(root, workers=1)
    assert pooled.workers == (2 if can_fork() else 1) and inline.workers == 1
    strip = {"elapsed_s", "workers"}
    assert {k: v for k, v in pooled.to_json().items() if k not in strip} == {
        k: v for k, v in inline.to_json().items() if k not in strip
    }
