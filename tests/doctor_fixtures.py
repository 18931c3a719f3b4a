"""Small generated data sets for the doctor tests (`<root>/<split>/<class>/<image>`)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from edge_build.cli import main
from edge_build.dataset import SPLITS
from edge_build.taxonomy import CODES


def smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A photo-like (low-frequency) random RGB image: distinct seeds give unrelated perceptual hashes."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return grid.resize((size, size), Image.Resampling.BICUBIC)


def make_dataset(root: Path, per_class: int = 2, splits: tuple[str, ...] = SPLITS) -> Path:
    """A clean data set: every class in every split, `per_class` distinct JPEGs each."""
    seed = 0
    for split in splits:
        for code in CODES:
            folder = root / split / code
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                smooth_image(seed).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels and that holds no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def run_doctor_cli(root: Path, *args: str) -> Result:
    """`edge-build doctor --data root ...`, asserting it ended through an exit code, never a traceback."""
    result = CliRunner().invoke(main, ["doctor", "--data", str(root), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def line_naming(output: str, path: str) -> str:
    """The one report line that names `path` and says how to fix it."""
    lines = [line for line in output.splitlines() if path in line and "Fix:" in line]
    assert len(lines) == 1, f"expected one line naming {path!r} with a fix in:\n{output}"
    return lines[0]
