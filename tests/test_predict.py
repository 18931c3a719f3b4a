"""Prediction: every image mode and format decodes to the right orientation and RGB order; clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import edge_build
from edge_build import predictor, runners, taxonomy
from edge_build.cli import main
from edge_build.errors import EdgeBuildError
from edge_build.images import ImageError
from edge_build.preprocessing import Preprocessing

TOP, BOTTOM, LEFT, RIGHT = 3, 4, 5, 6  # class the fake network answers for "the bright/red half is at ..."


class HalfFinder:
    """Stands in for the network: which half of the image is red (or bright)? A BGR or unrotated
    image gives another answer than the correctly decoded one."""

    def __init__(self, cell, name="fake"):
        self.name = name

    def run(self, batch: np.ndarray) -> np.ndarray:
        r, g, b = batch[:, 0], batch[:, 1], batch[:, 2]
        score = r - b + g  # red: +1 -(-1) -1 = 1; blue: -1; white: 1; black: -1
        h, w = score.shape[1] // 2, score.shape[2] // 2
        halves = np.stack(
            [
                score[:, :h].mean((1, 2)),
                score[:, h:].mean((1, 2)),
                score[:, :, :w].mean((1, 2)),
                score[:, :, w:].mean((1, 2)),
            ],
            axis=1,
        )
        probabilities = np.full((len(batch), taxonomy.NUM_CLASSES), 0.01, np.float32)
        probabilities[np.arange(len(batch)), TOP + halves.argmax(1)] = 1.0 - 0.01 * (taxonomy.NUM_CLASSES - 1)
        return probabilities


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(
        predictor, "_model", lambda build_dir: SimpleNamespace(network=None, preprocessing=Preprocessing(size=32))
    )
    monkeypatch.setattr(runners, "MindSporeRunner", HalfFinder)


def red_top_blue_bottom(height: int = 60, width: int = 80) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = (255, 0, 0)
    pixels[height // 2 :] = (0, 0, 255)
    return pixels


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_cases(tmp: Path) -> dict[str, Path]:
    rgb = Image.fromarray(red_top_blue_bottom())
    gray = np.zeros((60, 80), np.uint8)
    gray[:30] = 255
    cases = {
        "jpeg": save(rgb, tmp / "a.jpg", quality=95),
        "png": save(rgb, tmp / "a.png"),
        "bmp": save(rgb, tmp / "a.bmp"),
        "webp": save(rgb, tmp / "a.webp", lossless=True),
        "tiff": save(rgb, tmp / "a.tiff"),
        "palette": save(rgb.convert("P"), tmp / "p.png"),
        "grayscale": save(Image.fromarray(gray, "L"), tmp / "g.png"),
        "grayscale16": save(Image.fromarray(gray.astype(np.uint16) * 257), tmp / "g16.png"),
        "rgba": save(rgb.convert("RGBA"), tmp / "rgba.png"),
        "cmyk": save(rgb.convert("CMYK"), tmp / "cmyk.jpg", quality=95),
    }
    # Transparent top over an opaque blue bottom: transparency is composited on white (bright top).
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[30:] = (0, 0, 255, 255)
    cases["transparent"] = save(Image.fromarray(rgba, "RGBA"), tmp / "t.png")
    # Stored with red on the left, EXIF orientation 6 (rotate 90 degrees clockwise to display): red on top.
    stored = Image.fromarray(np.rot90(red_top_blue_bottom(), k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    cases["exif_rotated"] = save(stored, tmp / "rot.jpg", exif=exif.tobytes(), quality=95)
    return cases


def test_every_format_and_mode_is_read_upright_and_in_rgb_order(tmp_path, fake_model):
    cases = make_cases(tmp_path)
    results = predictor.predict_many(list(cases.values()))
    answers = {name: result.index for name, result in zip(cases, results, strict=True)}
    assert answers == dict.fromkeys(cases, TOP)
    assert Image.open(cases["cmyk"]).mode == "CMYK"
    assert Image.open(cases["grayscale16"]).mode.startswith("I")


def test_exif_orientation_is_what_makes_the_difference(tmp_path, fake_model):
    stored = Image.fromarray(np.rot90(red_top_blue_bottom(), k=1).copy())
    assert predictor.predict(save(stored, tmp_path / "plain.jpg", quality=95)).index == LEFT


def test_array_input_and_the_python_api(fake_model):
    result = edge_build.predict(red_top_blue_bottom())
    assert result.index == TOP
    cls = taxonomy.CLASSES[TOP]
    assert str(result) == cls.english == result.english
    assert (result.chinese, result.bin, result.bin_chinese) == (cls.chinese, cls.bin.english, cls.bin.chinese)
    assert result.probability == pytest.approx(0.75)
    assert result.top5[0] == (cls.code, pytest.approx(0.75)) and len(result.top5) == 5
    bgr = red_top_blue_bottom()[:, :, ::-1].copy()  # what OpenCV would have handed over
    assert edge_build.predict(bgr).index == BOTTOM


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: np.zeros((20, 20), np.uint8), "HxWx3"),
        (lambda tmp: np.zeros((20, 20, 4), np.uint8), "HxWx3"),
        (lambda tmp: np.zeros((20, 20, 3), np.float32), "uint8"),
        (lambda tmp: [[1, 2, 3]], "numpy array"),
        (lambda tmp: tmp / "missing.jpg", "no such file"),
        (lambda tmp: tmp, "directory"),
        (lambda tmp: written(tmp / "empty.jpg", b""), "empty file"),
        (lambda tmp: written(tmp / "text.jpg", b"hello"), "not an image"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, fake_model, make, message):
    with pytest.raises(ImageError, match=message):
        predictor.predict(make(tmp_path))


def test_a_truncated_jpeg_names_the_file(tmp_path, fake_model):
    path = save(Image.fromarray(red_top_blue_bottom()), tmp_path / "cut.jpg", quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageError, match=r"cut\.jpg"):
        predictor.predict(path)


def test_missing_checkpoint_says_which_command_builds_it(tmp_path):
    with pytest.raises(EdgeBuildError, match="edge-build train") as info:
        predictor.predict(red_top_blue_bottom(), build_dir=tmp_path / "empty-build")
    assert "empty-build" in str(info.value)


def test_cli_prints_class_bin_probability_and_json(tmp_path, fake_model):
    path = make_cases(tmp_path)["png"]
    result = CliRunner().invoke(main, ["predict", str(path), "--build", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    cls = taxonomy.CLASSES[TOP]
    assert f"{cls.english} ({cls.chinese})" in result.output and cls.bin.chinese in result.output
    assert "p = 0.750" in result.output
    result = CliRunner().invoke(main, ["predict", str(path), str(path), "--json", "--build", str(tmp_path / "b")])
    payload = json.loads(result.output)
    assert [p["code"] for p in payload] == [cls.code, cls.code]
    assert payload[0]["source"] == str(path) and payload[0]["bin"] == cls.bin.english


def test_cli_bad_image_exits_2_naming_it(tmp_path, fake_model):
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "nope.png"), "--build", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "nope.png" in result.output and "Traceback" not in result.output
