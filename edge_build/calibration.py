"""The calibration set: a committed list of training images (split/class/file + sha256).

Int8 calibration must be reproducible: the list is data in the repository, stratified
over the classes of the training split (never validation), regenerated only on
request (`edge-build calibrate`), and refused when any listed image's content no
longer matches its recorded hash.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic
from edge_build.dataset import ImageRef, list_split
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_bytes, sha256_file
from edge_build.images import ImageError, load_rgb
from edge_build.taxonomy import BY_CODE, CODES

SCHEMA = 1
SPLIT = "train"
DEFAULT_PER_CLASS = 10
DEFAULT_SEED = 0
_REGENERATE = "regenerate it with `edge-build calibrate` and commit the new list"


@dataclass(frozen=True)
class CalibrationSet:
    """A verified calibration list: the images to feed the quantizer, in list order."""

    path: Path
    refs: tuple[ImageRef, ...]
    hashes: tuple[str, ...]
    per_class: int
    seed: int

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def paths(self) -> list[Path]:
        return [ref.path for ref in self.refs]

    @property
    def fingerprint(self) -> str:
        """Identity of the content: the image hashes in order (not the list file's formatting)."""
        return sha256_bytes("\n".join(f"{r.key} {h}" for r, h in zip(self.refs, self.hashes, strict=True)).encode())

    def batches(self, preprocessing: Any, batch_size: int = 1) -> Iterator[np.ndarray]:
        """Preprocessed float batches through the one shared `Preprocessing`."""
        paths = self.paths
        for start in range(0, len(paths), batch_size):
            yield preprocessing.prepare_batch(paths[start : start + batch_size])


def calibration_file(calibration_dir: Path, data_root: Path) -> Path:
    """`calibration/<data set name>.json`: one list per data set."""
    return Path(calibration_dir) / f"{Path(data_root).resolve().name}.json"


def generate_calibration(
    data_root: Path, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED
) -> dict[str, Any]:
    """Pick `per_class` decodable, distinct training images per class, reproducibly.

    The same data set, `per_class` and `seed` always give the same list. Images that do
    not decode and byte-identical duplicates (of each other or of a validation
    image) are passed over (the data set is not clean).
    """
    if per_class < 1:
        raise EdgeBuildError(f"--per-class must be at least 1, got {per_class}")
    data_root = Path(data_root)
    by_class: dict[str, list[ImageRef]] = {code: [] for code in CODES}
    for ref in list_split(data_root, SPLIT):
        by_class[ref.code].append(ref)
    rng = random.Random(seed)
    # Training images byte-identical to a validation image would leak validation data into calibration.
    seen: set[str] = {sha256_file(ref.path) for ref in _validation_refs(data_root)}
    short: dict[str, int] = {}
    images = []
    for code in CODES:
        candidates = by_class[code]
        if not candidates:
            raise EdgeBuildError(
                f"{data_root / SPLIT / code}: no training images for class {code} ({BY_CODE[code].english})",
                "every class needs training images to calibrate on",
            )
        order = list(range(len(candidates)))
        rng.shuffle(order)
        chosen = []
        for index in order:
            ref = candidates[index]
            digest = sha256_file(ref.path)
            if digest in seen:
                continue
            try:
                load_rgb(ref.path)
            except ImageError:
                continue
            seen.add(digest)
            chosen.append((ref, digest))
            if len(chosen) == per_class:
                break
        if len(chosen) < per_class:
            short[code] = len(chosen)
        for ref, digest in sorted(chosen, key=lambda item: item[0].path.name):
            images.append({"split": ref.split, "class": ref.code, "file": ref.path.name, "sha256": digest})
    if not images:
        raise EdgeBuildError(
            f"{data_root / SPLIT}: no usable training image to calibrate on", "run `edge-build doctor`"
        )
    return {
        "schema": SCHEMA,
        "dataset": data_root.resolve().name,
        "split": SPLIT,
        "per_class": per_class,
        "seed": seed,
        "count": len(images),
        # Classes with fewer usable images than per_class (all of theirs are used; 0 = every training
        # image of the class failed to decode or is a copy of a validation image).
        "short_classes": short,
        "images": images,
    }


def _validation_refs(data_root: Path) -> list[ImageRef]:
    if not (data_root / "val").is_dir():
        return []
    return list_split(data_root, "val")


def write_calibration(path: Path, listing: dict[str, Any]) -> Path:
    return atomic.write_json(path, listing)


def _entries(path: Path, listing: Any) -> list[dict[str, str]]:
    if not isinstance(listing, dict) or listing.get("schema") != SCHEMA or not isinstance(listing.get("images"), list):
        raise EdgeBuildError(f"{path}: not a calibration list (schema {SCHEMA})", _REGENERATE)
    entries = listing["images"]
    if not entries:
        raise EdgeBuildError(f"{path}: the calibration list is empty", _REGENERATE)
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("split", "class", "file")):
            raise EdgeBuildError(f"{path}: entry {number} lacks split/class/file", _REGENERATE)
        if not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
            raise EdgeBuildError(f"{path}: entry {number} ({entry['file']}) has no sha256", _REGENERATE)
        if entry["split"] != SPLIT:
            raise EdgeBuildError(
                f"{path}: entry {number} ({entry['split']}/{entry['class']}/{entry['file']}) is not from the "
                f"'{SPLIT}' split",
                "calibration images come from training data only, never validation",
            )
        if entry["class"] not in BY_CODE or Path(entry["file"]).name != entry["file"]:
            raise EdgeBuildError(f"{path}: entry {number} names an invalid class or file: {entry}", _REGENERATE)
    return entries


def load_calibration(path: Path, data_root: Path) -> CalibrationSet:
    """Read a calibration list and check every image against its hash (the first mismatch raises)."""
    path, data_root = Path(path), Path(data_root)
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeBuildError(f"calibration list not found: {path}", "create it with `edge-build calibrate`") from None
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"{path}: unreadable calibration list ({exc})", _REGENERATE) from exc
    refs, hashes = [], []
    for entry in _entries(path, listing):
        ref = ImageRef(entry["split"], entry["class"], data_root / entry["split"] / entry["class"] / entry["file"])
        if not ref.path.is_file():
            raise EdgeBuildError(f"{path}: {ref.key} is listed but missing from the data set {data_root}", _REGENERATE)
        actual = sha256_file(ref.path)
        if actual != entry["sha256"]:
            raise EdgeBuildError(
                f"{path}: {ref.key} changed since the list was made "
                f"(sha256 {actual[:12]}… != recorded {entry['sha256'][:12]}…)",
                _REGENERATE,
            )
        refs.append(ref)
        hashes.append(actual)
    return CalibrationSet(
        path=path,
        refs=tuple(refs),
        hashes=tuple(hashes),
        per_class=int(listing.get("per_class", 0)),
        seed=int(listing.get("seed", 0)),
    )


def ensure_calibration(calibration_dir: Path, data_root: Path, log: Any = None) -> CalibrationSet:
    """The verified calibration set of `data_root`; generated (and written) only when no list exists yet."""
    path = calibration_file(calibration_dir, data_root)
    if not path.exists():
        write_calibration(path, generate_calibration(data_root))
        if log:
            log(f"calibration: wrote a new list {path} (commit it to keep int8 builds reproducible)")
    return load_calibration(path, data_root)


def calibration_keys(calibration: CalibrationSet) -> Sequence[str]:
    return [ref.key for ref in calibration.refs]
