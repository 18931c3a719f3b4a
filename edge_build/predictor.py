"""Classify images with the trained network: `edge_build.predict(image)` and `edge-build predict`.

An image is a path (JPEG, PNG, BMP, WebP, grayscale, RGBA, CMYK, EXIF-rotated: all go
through `images.load_rgb`) or an HxWx3 uint8 RGB array. The network is loaded once per
build directory and process, and reloaded when its checkpoint changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import taxonomy
from edge_build.images import ImageError, as_rgb_array

ImageInput = np.ndarray | str | os.PathLike[str]
BATCH_SIZE = 32


@dataclass(frozen=True)
class Prediction:
    index: int
    code: str
    english: str
    chinese: str
    bin: str
    bin_chinese: str
    bin_code: str
    probability: float
    top5: tuple[tuple[str, float], ...]  # (class code, probability), best first
    source: str | None = None  # the path, when the image came from a file

    def __str__(self) -> str:
        return self.english

    def as_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["top5"] = [{"code": code, "probability": p} for code, p in self.top5]
        return payload


class _Loaded:
    def __init__(self, trained: Any, stamp: tuple[int, int]) -> None:
        from edge_build.msenv import mindspore_module
        from edge_build.training import cap_cpu_threads

        cap_cpu_threads(mindspore_module())
        self.trained = trained
        self.stamp = stamp
        self.network = trained.network(fold_bn=True, softmax=True)
        self.preprocessing = trained.preprocessing


_CACHE: dict[Path, _Loaded] = {}
_LOCK = threading.Lock()


def _model(build_dir: Path | str | None) -> _Loaded:
    from edge_build.config import load_settings
    from edge_build.trained import load_trained

    directory = Path(build_dir) if build_dir is not None else load_settings().build_dir
    directory = directory.resolve()
    with _LOCK:
        trained = load_trained(directory)
        stat = trained.checkpoint.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        loaded = _CACHE.get(directory)
        if loaded is None or loaded.stamp != stamp:
            loaded = _Loaded(trained, stamp)
            _CACHE[directory] = loaded
        return loaded


def _as_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageError(f"{path}: no such file", "check the path")
        if path.is_dir():
            raise ImageError(f"{path}: is a directory, not an image", "pass image files")
    return as_rgb_array(image)


def _prediction(probabilities: np.ndarray, source: str | None) -> Prediction:
    order = np.argsort(-probabilities, kind="stable")
    best = taxonomy.CLASSES[int(order[0])]
    return Prediction(
        index=best.index,
        code=best.code,
        english=best.english,
        chinese=best.chinese,
        bin=best.bin.english,
        bin_chinese=best.bin.chinese,
        bin_code=best.bin.code,
        probability=float(probabilities[order[0]]),
        top5=tuple((taxonomy.CLASSES[int(i)].code, float(probabilities[i])) for i in order[:5]),
        source=source,
    )


def predict_many(images: Sequence[ImageInput], build_dir: Path | str | None = None) -> list[Prediction]:
    """Classify several images (paths or HxWx3 uint8 RGB arrays), in batches."""
    from edge_build.runners import MindSporeRunner

    arrays = [_as_array(image) for image in images]  # every input checked before the model loads
    sources = [str(image) if isinstance(image, (str, os.PathLike)) else None for image in images]
    if not arrays:
        return []
    model = _model(build_dir)
    runner = MindSporeRunner(model.network)
    results: list[Prediction] = []
    for start in range(0, len(arrays), BATCH_SIZE):
        batch = model.preprocessing.prepare_batch(arrays[start : start + BATCH_SIZE])
        probabilities = runner.run(batch)
        results.extend(
            _prediction(p, s) for p, s in zip(probabilities, sources[start : start + BATCH_SIZE], strict=True)
        )
    return results


def predict(image: ImageInput, build_dir: Path | str | None = None) -> Prediction:
    """Classify one image; `str(result)` is the class name (English), `.chinese`, `.bin`, `.probability`."""
    return predict_many([image], build_dir=build_dir)[0]
