"""`edge-build doctor` on broken data sets: one clear line naming the path and the fix, never a traceback.

Every case is generated in tmp_path. Exit 2 where nothing can be checked at all, exit 1
where the check ran and found errors.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path

import pytest
from doctor_fixtures import line_naming, make_dataset, png_header_only, run_doctor_cli, smooth_image

from edge_build import images
from edge_build.doctor import run_doctor
from edge_build.errors import EdgeBuildError


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def _only_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_clean_generated_data_set_passes(data):
    result = run_doctor_cli(data)
    assert result.exit_code == 0, result.output
    assert "verdict: PASS" in result.output
    report = run_doctor(data)
    assert [f.code for f in report.findings] == ["no_label_file"]  # a note, not a defect


def test_data_root_missing(tmp_path):
    missing = tmp_path / "no such data"
    result = run_doctor_cli(missing)
    assert result.exit_code == 2
    line = _only_line(result.output)
    assert str(missing) in line and "--data" in line and "EDGE_BUILD_DATA" in line
    with pytest.raises(EdgeBuildError, match="not found"):
        run_doctor(missing)


def test_data_root_is_a_file(tmp_path):
    a_file = tmp_path / "data.zip"
    a_file.write_bytes(b"PK\x03\x04")
    result = run_doctor_cli(a_file)
    assert result.exit_code == 2
    line = _only_line(result.output)
    assert str(a_file) in line and "not a directory" in line
    with pytest.raises(EdgeBuildError, match="a file, not a folder"):
        run_doctor(a_file)


def test_data_root_without_any_split(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_doctor_cli(empty)
    assert result.exit_code == 2
    line = _only_line(result.output)
    assert str(empty) in line and "<root>/<split>/<class code>/<image>" in line


def test_data_root_pointing_at_a_split_says_to_pass_the_parent(data):
    result = run_doctor_cli(data / "train")
    assert result.exit_code == 2
    assert "pass its parent folder" in _only_line(result.output)


def test_split_missing(data):
    shutil.rmtree(data / "val")
    result = run_doctor_cli(data)
    assert result.exit_code == 1  # train can still be checked: the check runs and fails
    line = line_naming(result.output, "val: ")
    assert "no 'val' folder" in line and "create <root>/<split>/<class code>/" in line


def test_class_folder_not_in_taxonomy(data):
    (data / "train" / "04_00").mkdir()
    smooth_image(999).save(data / "train" / "04_00" / "x.jpg")
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "train/04_00")
    assert "not in the taxonomy" in line and "rename to a code 00_00 ... 03_03" in line


def test_empty_class(data):
    for image in (data / "val" / "02_01").iterdir():
        image.unlink()
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "val/02_01")
    assert "no image files" in line and "add images of the class" in line


def test_zero_byte_file(data):
    (data / "train" / "00_00" / "empty.jpg").write_bytes(b"")
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "train/00_00/empty.jpg")
    assert "0 bytes" in line and "delete" in line


def test_text_file_named_jpg(data):
    (data / "train" / "00_01" / "notes.jpg").write_text("these are my notes, not a photo\n")
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "train/00_01/notes.jpg")
    assert "not an image: text 'these are my notes" in line


def test_truncated_jpeg(data):
    buffer = io.BytesIO()
    smooth_image(7, size=128).save(buffer, "JPEG", quality=95)
    (data / "train" / "00_02" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "train/00_02/cut.jpg")
    assert "truncated" in line and "re-download or re-export" in line


def test_corrupt_jpeg_is_not_called_truncated(data):
    buffer = io.BytesIO()
    smooth_image(8, size=128).save(buffer, "JPEG")
    broken = bytearray(buffer.getvalue())
    huffman_table = broken.find(b"\xff\xc4")
    broken[huffman_table + 5 : huffman_table + 25] = b"\xff" * 20
    (data / "val" / "00_02" / "garbled.jpg").write_bytes(bytes(broken))
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "val/00_02/garbled.jpg")
    assert "broken data stream" in line and "re-export or delete" in line
    assert run_doctor(data).finding("corrupt").paths == ["val/00_02/garbled.jpg"]


def test_decompression_bomb_is_refused_before_decoding(data, monkeypatch):
    bomb = data / "train" / "00_03" / "bomb.png"
    bomb.write_bytes(png_header_only(50_000, 50_000))
    decoded = []
    real_load_rgb = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda path: decoded.append(Path(path).name) or real_load_rgb(path))
    report = run_doctor(data)
    assert "bomb.png" not in decoded and len(decoded) == 104  # every other image was decoded
    finding = report.finding("too_large")
    assert (
        finding.paths == ["train/00_03/bomb.png"]
        and "50000x50000 pixels: over the 40,000,000-pixel limit" in finding.details[0]
    )
    line = line_naming(run_doctor_cli(data).output, "train/00_03/bomb.png")
    assert "decompression bomb" in line and "downscale" in line


def test_unreadable_file(data, monkeypatch):
    locked = data / "train" / "00_04" / "locked.jpg"
    smooth_image(123).save(locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the read fail the way chmod 0 does for a user
        real_read_bytes = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.name == "locked.jpg":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = run_doctor_cli(data)
    assert result.exit_code == 1
    line = line_naming(result.output, "train/00_04/locked.jpg")
    assert "Permission denied" in line and "chmod a+r" in line


def test_symlink_loop_file_and_folder(data):
    os.symlink("loop.jpg", data / "train" / "00_05" / "loop.jpg")
    shutil.rmtree(data / "val" / "00_06")
    os.symlink("00_06", data / "val" / "00_06")
    result = run_doctor_cli(data)
    assert result.exit_code == 1  # the looping class folder leaves val without class 00_06
    assert "loop symbolic link" in line_naming(result.output, "train/00_05/loop.jpg")
    assert "loop symbolic link" in line_naming(result.output, "val/00_06: loop")
    assert "add a folder of images" in line_naming(result.output, "val/00_06: no folder for class")
    report = run_doctor(data)
    assert report.finding("symlink_loop").paths == ["train/00_05/loop.jpg", "val/00_06"]
    assert report.finding("missing_class").paths == ["val/00_06"]


def test_path_with_spaces_and_non_ascii_just_works(tmp_path):
    root = make_dataset(tmp_path / "my data 数据 ñ", per_class=1)
    smooth_image(5000).save(root / "train" / "00_00" / "photo 1 ñ 照片.jpg")
    result = run_doctor_cli(root)
    assert result.exit_code == 0, result.output
    assert str(root) in result.output and "verdict: PASS" in result.output
    report = run_doctor(root)
    assert report.counts["train"]["00_00"] == {"files": 2, "usable": 2, "distinct": 2}
