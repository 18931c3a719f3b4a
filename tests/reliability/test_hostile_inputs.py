"""Hostile inputs: config and target files (wrong types, unknown keys, escaping paths, huge numbers,
absurd nesting), crafted images (decompression bombs, gigantic EXIF, metadata bombs, mismatched
extensions), and files that are not what their name says (checkpoint, ONNX, TFLite). Each one ends
in a one-line error naming the file, or in the correct result; never a traceback."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from harness import TARGETS, WEIGHTS, Reference, edge_build, one_line_error
from PIL import Image

from edge_build.cli import main
from edge_build.config import load_settings
from edge_build.errors import EdgeBuildError
from edge_build.images import ImageError, load_rgb
from edge_build.targets import load_target

pytestmark = pytest.mark.reliability

# --------------------------------------------------------------------------- config file

CONFIGS = {
    "wrong type": ("[paths]\ndata = 3\n", "paths.data must be a non-empty path"),
    "unknown key": ('[paths]\ndatta = "x"\n', "unknown key paths.datta"),
    "unknown table": ('[evil]\ncommand = "rm -rf /"\n', "unknown table [evil]"),
    "not TOML": ("[paths\ndata = ", "is not valid TOML"),
    "absurd nesting": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "huge value": (f'[paths]\nbuild = "{"a" * 100_000}"\n', "at most 4096 chars"),
    "build escapes the project": ('[paths]\nbuild = "../../etc/eb"\n', "paths.build = '../../etc/eb' points outside"),
    "dist is absolute": ('[paths]\ndist = "/tmp/elsewhere"\n', "paths.dist = '/tmp/elsewhere' points outside"),
    "calibration sneaks out": ('[paths]\ncalibration = "c/../../x"\n', "paths.calibration = 'c/../../x' points"),
}  # fmt: skip


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "project" / "edge-build.toml"
    path.parent.mkdir()
    monkeypatch.setenv("EDGE_BUILD_CONFIG", str(path))
    for name in ("DATA", "WEIGHTS", "DIR", "DIST", "TARGETS", "CALIBRATION"):
        monkeypatch.delenv(f"EDGE_BUILD_{name}", raising=False)
    return path


@pytest.mark.parametrize("case", list(CONFIGS))
def test_hostile_config_file_is_refused_naming_it(config_file, case):
    text, expected = CONFIGS[case]
    config_file.write_text(text)
    with pytest.raises(EdgeBuildError) as error:
        load_settings()
    assert str(config_file) in str(error.value) and expected in str(error.value), str(error.value)
    result = CliRunner().invoke(main, ["all", "--target", "lite"])
    assert (result.exit_code == 2 and result.exception is None) or isinstance(result.exception, SystemExit)
    assert result.output.count("error: ") == 1 and expected in result.output, result.output


def test_inputs_may_live_outside_the_project_outputs_only_by_explicit_choice(config_file, tmp_path):
    config_file.write_text('[paths]\ndata = "../../etc"\nweights = "/etc/hostname"\n')
    settings = load_settings()  # read-only inputs: anywhere (the default data set is ../shared/...)
    assert settings.data.path == (config_file.parent / "../../etc").resolve()
    config_file.write_text('[paths]\nbuild = "build"\ndist = "out/dist"\n')
    assert load_settings().build_dir == config_file.parent / "build"
    config_file.write_text('[paths]\nbuild = "../outside"\n')
    outside = tmp_path / "chosen"
    assert load_settings({"build": outside}).build_dir == outside  # an option is the user's own choice
    (config_file.parent / "link").symlink_to(tmp_path)
    config_file.write_text('[paths]\nbuild = "link/build"\n')
    with pytest.raises(EdgeBuildError, match="points outside"):
        load_settings()  # a symlink out of the project is out of the project


# --------------------------------------------------------------------------- target profiles

MINIMAL = 'description = "hostile"\nartifacts = ["onnx_fp32"]\n'
TARGET_FILES = {
    "wrong type": (MINIMAL + '[runtime]\nthreads = "2"\n', "runtime.threads = '2' is not allowed"),
    "bool for a number": (MINIMAL + "[runtime]\nthreads = true\n", "runtime.threads = True is not allowed"),
    "unknown top-level key": (MINIMAL + 'shell = "rm -rf /"\n', "unknown key 'shell'"),
    "unknown nested key": (MINIMAL + "[bench]\nruns = 10\nforever = true\n", "unknown key 'bench.forever'"),
    "huge integer": (MINIMAL + "[bench]\nruns = 99999999999999999999999999999\n", "bench.runs = 9999"),
    "huge float": (MINIMAL + "[bench]\nmin_time_s = 1e308\n", "bench.min_time_s = 1e+308"),
    "infinity": (MINIMAL + "[budget]\nlatency_ms = inf\n", "budget.latency_ms = inf"),
    "not a number": (MINIMAL + "[parity.int8]\nmin_cosine = nan\n", "parity.int8.min_cosine = nan"),
    "huge batch": (MINIMAL + "[bench]\nbatch_sizes = [1, 1000000000]\n", "bench.batch_sizes"),
    "unknown artifact": ('description = "x"\nartifacts = ["../../etc/passwd"]\n', "artifacts = ['../../etc/passwd']"),
    "absurd nesting": ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "not UTF-8": (b"description = \"\xff\xfe\"\n", "cannot read target profile"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TARGET_FILES))
def test_hostile_target_file_is_refused_naming_file_and_key(tmp_path, case):
    text, expected = TARGET_FILES[case]
    path = tmp_path / "hostile.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(EdgeBuildError) as error:
        load_target("hostile", tmp_path)
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


@pytest.mark.parametrize("file_name", ["..toml", ".toml", "a b.toml"])
def test_target_name_that_would_name_the_wrong_directory_is_refused(tmp_path, file_name):
    # `..toml` is named "." and its bundle dir dist/. is dist itself: publishing would swap out every bundle.
    path = tmp_path / file_name
    path.write_text(MINIMAL)
    with pytest.raises(EdgeBuildError, match="cannot be a target name"):
        load_target(str(path), tmp_path)
    args = ["all", "--target", str(path), "--targets", str(TARGETS), "--build", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "cannot be a target name" in result.output, result.output
    assert not (tmp_path / ".lock").exists()  # refused before it touched the build directory


# --------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, extra: bytes = b"") -> bytes:
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _small_png_pixels() -> tuple[bytes, np.ndarray]:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 120, 60, 200
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(32))
    return zlib.compress(raw), pixels


def _zeros_deflated(megabytes: int) -> bytes:
    compressor = zlib.compressobj(9)
    return b"".join(compressor.compress(b"\0" * (1 << 20)) for _ in range(megabytes)) + compressor.flush()


def _png_bomb() -> bytes:
    """100000 x 100000 RGB (30 GB decoded) in 60 kB: a real deflate stream of zero rows."""
    row = b"\x00" * (1 + 100_000 * 3)
    compressor = zlib.compressobj(9)
    return _png(100_000, 100_000, b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush())


def _jpeg_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_000, 65_000)
    return bytes(data)


def _png_with_gigantic_exif() -> bytes:
    """A 32x32 PNG whose eXIf chunk is 30 MB: 65535 IFD entries, each claiming a 2 GB string."""
    entries = b"".join(struct.pack("<HHII", 0x010E, 2, 0x7FFFFFFF, 8) for _ in range(65_535))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 65_535) + entries + b"\0" * 4 + b"\0" * (30 << 20)
    idat, _ = _small_png_pixels()
    return _png(32, 32, idat, _chunk(b"eXIf", tiff))


def _jpeg_with_hostile_exif() -> bytes:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 9999  # an orientation that does not exist
    exif[0x010E] = "A" * 60_000  # and a description filling the APP1 segment
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _png_metadata_bomb(kind: bytes) -> bytes:
    idat, _ = _small_png_pixels()
    payload = {b"zTXt": b"k\x00\x00", b"iCCP": b"p\x00\x00", b"iTXt": b"k\x00\x01\x00\x00\x00"}[kind]
    return _png(32, 32, idat, _chunk(kind, payload + _zeros_deflated(256)))  # 256 MB of text in 250 kB


REFUSED_IMAGES = {
    "png decompression bomb": (_png_bomb, "over the 40,000,000-pixel limit"),
    "jpeg decompression bomb": (_jpeg_bomb, "over the 40,000,000-pixel limit"),
    "zTXt metadata bomb": (lambda: _png_metadata_bomb(b"zTXt"), "corrupt"),
    "iCCP metadata bomb": (lambda: _png_metadata_bomb(b"iCCP"), "corrupt"),
    "iTXt metadata bomb": (lambda: _png_metadata_bomb(b"iTXt"), "corrupt"),
    "text named .jpg": (lambda: b"<html>not a photo</html>", "not an image file"),
    "tflite named .jpg": (lambda: WEIGHTS.read_bytes()[:4096], "not an image file"),
    "empty .jpg": (lambda: b"", "empty file"),
}


@pytest.mark.parametrize("case", list(REFUSED_IMAGES))
def test_hostile_image_is_refused_fast_naming_it(tmp_path, case):
    make, expected = REFUSED_IMAGES[case]
    path = tmp_path / "photo.jpg"
    path.write_bytes(make())
    started = time.perf_counter()
    with pytest.raises(ImageError) as error:
        load_rgb(path)
    assert time.perf_counter() - started < 5
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)


def test_gigantic_or_nonsense_exif_is_ignored_and_the_pixels_decode(tmp_path):
    path = tmp_path / "exif.png"
    path.write_bytes(_png_with_gigantic_exif())
    started = time.perf_counter()
    _, expected = _small_png_pixels()
    assert np.array_equal(load_rgb(path), expected)
    assert time.perf_counter() - started < 15
    path = tmp_path / "exif.jpg"
    path.write_bytes(_jpeg_with_hostile_exif())
    pixels = load_rgb(path)
    assert pixels.shape == (20, 40, 3) and pixels[..., 0].min() > 240  # unrotated, still red


def test_mismatched_extension_decodes_by_content(tmp_path):
    _, expected = _small_png_pixels()
    png_as_jpg = tmp_path / "really_a_png.jpg"
    Image.fromarray(expected).save(png_as_jpg, format="PNG")
    assert np.array_equal(load_rgb(png_as_jpg), expected)
    jpg_as_png = tmp_path / "really_a_jpeg.png"
    Image.fromarray(expected).save(jpg_as_png, format="JPEG", quality=95)
    assert np.abs(load_rgb(jpg_as_png).astype(int) - expected).max() <= 8


def test_doctor_reports_hostile_images_as_findings(tmp_path):
    from edge_build.doctor import inspect_image

    statuses = {}
    for name, (make, _) in REFUSED_IMAGES.items():
        path = tmp_path / f"{len(statuses)}.jpg"
        path.write_bytes(make())
        statuses[name] = inspect_image(str(path))["status"]
    assert statuses["png decompression bomb"] == statuses["jpeg decompression bomb"] == "too_large"
    assert statuses["text named .jpg"] == "not_image" and statuses["empty .jpg"] == "zero_byte"
    assert {statuses[f"{kind} metadata bomb"] for kind in ("zTXt", "iCCP", "iTXt")} == {"corrupt"}


@pytest.mark.slow
def test_predict_refuses_a_hostile_image_in_one_line(reference: Reference, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_metadata_bomb(b"zTXt"))
    run = edge_build("predict", path, "--build", reference.build, offline=False, timeout=300)
    assert run.returncode == 2 and str(path) in one_line_error(run), str(run)


# --------------------------------------------------------------------------- files that lie about their type


def _impostors(tmp_path: Path, reference_onnx: Path | None = None) -> dict[str, bytes]:
    from pickle_payload import evil_pickle

    kinds = {
        "pickle": evil_pickle(tmp_path / "PWNED"),
        "tflite": WEIGHTS.read_bytes()[:65536],
        "random bytes": np.random.default_rng(0).bytes(10_000),
        "empty": b"",
        "png": _png(8, 8, zlib.compress(b"\0" * (8 * 25))),
    }
    if reference_onnx is not None:
        kinds["truncated real model"] = reference_onnx.read_bytes()[:100_000]
    return kinds


@pytest.mark.slow
def test_checkpoint_that_is_not_a_checkpoint_is_refused(tmp_path):
    from edge_build import network

    head = network.build_head(26)
    for kind, data in _impostors(tmp_path).items():
        path = tmp_path / f"{kind.replace(' ', '_')}.ckpt"
        path.write_bytes(data)
        with pytest.raises(EdgeBuildError) as error:
            network.load_checkpoint(head, path)
        assert str(path) in str(error.value), (kind, str(error.value))
    assert not (tmp_path / "PWNED").exists()


def test_onnx_file_that_is_not_onnx_is_refused(tmp_path):
    from edge_build.onnx_graph import load_model, read_metadata
    from edge_build.runners import OnnxRunner

    for kind, data in _impostors(tmp_path).items():
        path = tmp_path / f"{kind.replace(' ', '_')}.onnx"
        path.write_bytes(data)
        for load in (load_model, read_metadata, OnnxRunner):
            with pytest.raises(EdgeBuildError) as error:
                load(path)
            assert str(path) in str(error.value), (kind, load, str(error.value))
    assert not (tmp_path / "PWNED").exists()


def test_weights_file_that_is_not_tflite_is_refused(tmp_path):
    from edge_build.tflite_reader import read_tflite

    for kind, data in _impostors(tmp_path).items():
        if kind == "tflite":
            continue
        path = tmp_path / f"{kind.replace(' ', '_')}.tflite"
        path.write_bytes(data)
        with pytest.raises(EdgeBuildError) as error:
            read_tflite(path)
        assert path.name in str(error.value), (kind, str(error.value))
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(WEIGHTS.read_bytes()[: WEIGHTS.stat().st_size // 3])
    with pytest.raises(EdgeBuildError, match=r"truncated\.tflite"):
        read_tflite(truncated)


def test_cli_refuses_impostor_models_in_one_line(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(WEIGHTS.read_bytes()[:65536])
    run = edge_build("quantize", "--model", fake, "--build", tmp_path / "build", offline=False, timeout=300)
    assert run.returncode == 2 and str(fake) in one_line_error(run), str(run)
    fake_weights = tmp_path / "weights.tflite"
    fake_weights.write_bytes(fake.read_bytes()[::-1])
    run = edge_build("weights", "import", fake_weights, "--build", tmp_path / "build", offline=False, timeout=300)
    assert run.returncode == 2 and fake_weights.name in one_line_error(run), str(run)
