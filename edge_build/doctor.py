"""`doctor`: check a data set laid out as `<root>/<split>/<class code>/<image>` and report its defects.

`run_doctor` walks the layout, inspects every image (read, sha256, header, the
pipeline's own decode via `images.load_rgb`, perceptual hashes), then compares
them: exact duplicates by content hash within a class, across classes (the same
bytes under two labels) and across splits (leakage); near-duplicates by
perceptual hash, reported separately. The result is data (`DoctorReport.to_json`,
paths relative to the root); `doctor_render` turns it into text.

Severities: an *error* makes the data set wrong for training or evaluation (exit 1);
a *warning* is a defect worth fixing (exit 1 only with `strict`); an *info* says what
the pipeline will do and never changes the exit code. A data set that cannot be
read at all raises `EdgeBuildError` (exit 2).
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import stat
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_build import images
from edge_build.dataset import IMAGE_SUFFIXES, SPLITS
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_bytes
from edge_build.taxonomy import BY_CODE, CODES, compare_label_file

SCHEMA = 1
SEVERITIES = ("error", "warning", "info")

#: Near-duplicates: two distinct files whose 64-bit pHash and dHash are both this close (Hamming
#: distance). Chosen on the shared data set: every pair within both bounds is the same photo
#: re-encoded, rescaled or slightly cropped; the closest unrelated pair (a hat and a can of
#: crisps) has pHash distance 6 but dHash distance 23.
NEAR_PHASH_MAX = 6
NEAR_DHASH_MAX = 12
#: A class with fewer distinct images than this fraction of its split's median is underrepresented.
UNDERREPRESENTED_FRACTION = 0.5
#: Images with a side shorter than this are upscaled more than 7x to the model's 224 px input.
SMALL_SIDE = 32
#: Below this many files the images are inspected in-process: starting a process pool costs more.
INLINE_BELOW = 200
_EXIF_ORIENTATION = 0x0112

#: What `images.to_rgb` (the pipeline's decode) does with each PIL mode.
MODE_ACTIONS = {
    "RGB": "used as is",
    "L": "grayscale: replicated to 3 channels",
    "1": "bilevel: expanded to black/white RGB",
    "P": "palette: expanded to RGB, transparency composited on white",
    "RGBA": "alpha composited on white, then RGB",
    "LA": "alpha composited on white, then RGB",
    "PA": "alpha composited on white, then RGB",
    "CMYK": "converted to RGB by PIL's formula (no ICC profile: colors approximate)",
    "YCbCr": "converted to RGB",
    "I;16": "16-bit: scaled to 8 bits (value / 65535 * 255), then RGB",
    "I;16B": "16-bit: scaled to 8 bits (value / 65535 * 255), then RGB",
    "I;16L": "16-bit: scaled to 8 bits (value / 65535 * 255), then RGB",
    "I": "32-bit integer: scaled by the image's own maximum to 8 bits, then RGB",
    "F": "32-bit float: scaled by the image's own maximum to 8 bits, then RGB",
}

#: Every kind of finding: code -> (severity, what it counts, the fix).
CHECKS: dict[str, tuple[str, str, str]] = {
    # layout
    "missing_split": (
        "error",
        "splits missing",
        f"create <root>/<split>/<class code>/ folders for {', '.join(SPLITS)}",
    ),
    "missing_class": ("error", "class folders missing", "add a folder of images for each class in every split"),
    "unknown_class": (
        "error",
        "class folders not in the taxonomy",
        f"rename to a code {CODES[0]} ... {CODES[-1]} or remove",
    ),
    "empty_class": ("error", "class folders without images", "add images of the class or remove the folder"),
    "unreadable_folder": ("error", "folders that cannot be listed", "make readable (chmod a+rx)"),
    "symlink_loop": ("warning", "symbolic links that loop", "remove the link or point it at a real file or folder"),
    "symlink_broken": ("warning", "broken symbolic links", "remove the link or point it at a real file or folder"),
    "nested_folder": ("warning", "folders inside class folders, ignored", "move the images up into the class folder"),
    "ignored_file": (
        "info",
        "files the pipeline ignores (not <split>/<class>/<image>)",
        "move into a class folder or delete",
    ),
    "extra_folder": ("info", "folders at the root that are not splits, ignored", "nothing to do"),
    # label.txt
    "no_label_file": ("info", "data sets without label.txt: the built-in taxonomy is used", "nothing to do"),
    "label_file_unreadable": (
        "warning",
        "label.txt files that cannot be read",
        "save as UTF-8 or GBK text, or delete",
    ),
    "label_file_disagrees": (
        "warning",
        "disagreements between label.txt and the built-in taxonomy (the folder code wins)",
        "fix label.txt or the folder names",
    ),
    # one file
    "zero_byte": ("error", "empty files (0 bytes)", "delete or replace with the real image"),
    "unreadable": ("error", "files that cannot be read", "make readable (chmod a+r) or remove"),
    "not_image": ("error", "files named as images that are not images", "delete or replace with a real image"),
    "too_large": (
        "error",
        f"images over {images.MAX_PIXELS:,} pixels, refused before decoding (decompression bomb?)",
        "downscale (e.g. to 1024 px on the long side) or delete",
    ),
    "truncated": ("error", "truncated images (the file ends inside the image data)", "re-download or re-export"),
    "corrupt": ("error", "images whose data cannot be decoded", "re-export or delete"),
    "small_image": ("warning", f"images with a side under {SMALL_SIDE} px", "replace with a larger image"),
    "non_rgb_mode": ("info", "images not in RGB mode: the pipeline converts them", "nothing to do (see details)"),
    "exif_rotated": ("info", "images with an EXIF rotation: the pipeline applies it", "nothing to do"),
    # comparisons
    # A warning, not an error: the build can proceed and `eval` reports accuracy with and
    # without the leaked images; `--strict` turns it into an error for curated data sets.
    "leakage": (
        "warning",
        "non-training images byte-identical to a training image (leakage)",
        "delete from val (or the copies from train) so that val measures unseen images",
    ),
    "label_conflict": (
        "error",
        "files whose exact bytes also appear under another class",
        "keep each image under its one correct class",
    ),
    "duplicate_in_class": (
        "warning",
        "byte-identical copies of another file in the same class folder",
        "delete the extra copy: copies weight one image several times",
    ),
    "underrepresented_class": (
        "warning",
        f"classes with under {UNDERREPRESENTED_FRACTION:.0%} of their split's median number of distinct images",
        "add distinct images of the class (copies do not count)",
    ),
    "near_duplicate_across_classes": (
        "warning",
        "near-duplicate pairs under different classes (perceptual hash)",
        "check the labels: probably one photo under two classes",
    ),
    "near_duplicate_across_splits": (
        "warning",
        "near-duplicate pairs across splits (perceptual hash): probable leakage",
        "keep one version of the photo, in one split",
    ),
    "near_duplicate_in_class": (
        "info",
        "near-duplicate pairs within a class (perceptual hash)",
        "keep one of each pair unless both add something",
    ),
}


@dataclass
class Finding:
    """One kind of defect (or note): the paths it concerns, relative to the root, and the fix."""

    severity: str
    code: str
    message: str
    hint: str
    paths: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "count": len(self.paths),
            "paths": self.paths,
            "details": self.details,
        }


class _Findings:
    """Collects paths per finding code, in discovery order."""

    def __init__(self) -> None:
        self._by_code: dict[str, tuple[list[str], list[str]]] = {}

    def add(self, code: str, path: str, detail: str) -> None:
        paths, details = self._by_code.setdefault(code, ([], []))
        paths.append(display_path(path))
        details.append(detail)

    def findings(self) -> list[Finding]:
        result = []
        for code, (paths, details) in self._by_code.items():
            severity, what, hint = CHECKS[code]
            result.append(Finding(severity, code, f"{len(paths)} {what}", hint, paths, details))
        order = {severity: i for i, severity in enumerate(SEVERITIES)}
        return sorted(result, key=lambda f: order[f.severity])  # stable: discovery order within a severity


@dataclass
class DoctorReport:
    """Everything doctor found; `to_json()` is the stable, data-first form (schema `SCHEMA`)."""

    root: Path
    strict: bool
    splits_found: list[str]
    extra_folders: list[str]
    classes_found: dict[str, list[str]]
    counts: dict[str, dict[str, dict[str, int]]]
    label_file: dict[str, Any]
    images: dict[str, Any]
    imbalance: dict[str, Any]
    duplicates: dict[str, Any]
    near_duplicates: dict[str, Any]
    findings: list[Finding]
    elapsed_s: float
    workers: int

    def of_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self.of_severity("error")

    @property
    def warnings(self) -> list[Finding]:
        return self.of_severity("warning")

    def finding(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    @property
    def exit_code(self) -> int:
        """0 clean or warnings only; 1 errors (with `strict`, warnings count as errors)."""
        return 1 if self.errors or (self.strict and self.warnings) else 0

    @property
    def verdict(self) -> str:
        """'fail', 'warn' (warnings only, not strict) or 'pass'."""
        if self.exit_code:
            return "fail"
        return "warn" if self.warnings else "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tool": "edge-build doctor",
            "root": display_path(str(self.root)),
            "layout": "<root>/<split>/<class code>/<image>",
            "expected": {"splits": list(SPLITS), "classes": list(CODES)},
            "found": {"splits": self.splits_found, "extra_folders": self.extra_folders, "classes": self.classes_found},
            "label_file": self.label_file,
            "counts": self.counts,
            "imbalance": self.imbalance,
            "images": self.images,
            "duplicates": self.duplicates,
            "near_duplicates": self.near_duplicates,
            "findings": [f.as_dict() for f in self.findings],
            "summary": {
                severity: {
                    "findings": len(self.of_severity(severity)),
                    "paths": sum(len(f.paths) for f in self.of_severity(severity)),
                }
                for severity in SEVERITIES
            },
            "strict": self.strict,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "elapsed_s": round(self.elapsed_s, 3),
            "workers": self.workers,
        }


# --------------------------------------------------------------------------- the layout


def display_path(path: str) -> str:
    """A path safe to print and to put in JSON (bytes that are not UTF-8 shown as escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entries(directory: Path | str) -> list[os.DirEntry[str]]:
    with os.scandir(directory) as scan:
        return sorted(scan, key=lambda entry: entry.name)


def _kind(entry: os.DirEntry[str]) -> str:
    """'dir', 'file', 'loop' (symlink loop), 'broken' (dangling symlink) or 'other' (fifo, socket...)."""
    try:
        mode = os.stat(entry.path).st_mode  # follows symlinks
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "loop"
        return "broken" if entry.is_symlink() else "other"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


@dataclass
class _Layout:
    splits_found: list[str] = field(default_factory=list)
    extra_folders: list[str] = field(default_factory=list)
    classes_found: dict[str, list[str]] = field(default_factory=dict)
    #: (split, class code, path relative to the root, absolute path) of every file the pipeline reads
    files: list[tuple[str, str, str, str]] = field(default_factory=list)


def _root_entries(root: Path) -> list[os.DirEntry[str]]:
    hint = "point --data (or EDGE_BUILD_DATA) at a folder laid out as <root>/<split>/<class code>/<image>"
    if root.is_symlink() and not root.exists():
        raise EdgeBuildError(f"data set root {root} is a broken or looping symbolic link", hint)
    if not root.exists():
        raise EdgeBuildError(f"data set root not found: {root}", hint)
    if not root.is_dir():
        raise EdgeBuildError(f"data set root is a file, not a folder: {root}", hint)
    try:
        entries = _entries(root)
    except OSError as exc:
        raise EdgeBuildError(f"cannot list the data set root {root}: {exc.strerror}", "make it readable") from exc
    folders = {entry.name for entry in entries if _kind(entry) == "dir"}
    if not folders & set(SPLITS):
        if folders & set(CODES):
            hint = f"{root} holds class folders, so it looks like one split: pass its parent folder"
        raise EdgeBuildError(f"data set {root} has no {' or '.join(SPLITS)} folder", hint)
    return entries


def _walk(root: Path, found: _Findings) -> _Layout:
    layout = _Layout()
    for entry in _root_entries(root):
        kind = _kind(entry)
        if kind == "dir" and entry.name not in SPLITS:
            layout.extra_folders.append(display_path(entry.name))
            found.add("extra_folder", entry.name, "not a split: ignored")
        elif kind in ("loop", "broken"):
            found.add(f"symlink_{kind}", entry.name, f"{kind} symbolic link")
    for split in SPLITS:
        if not (root / split).is_dir():
            found.add("missing_split", split, f"no '{split}' folder in the data set")
            continue
        layout.splits_found.append(split)
        layout.classes_found[split] = []
        try:
            entries = _entries(root / split)
        except OSError as exc:
            found.add("unreadable_folder", split, f"cannot list: {exc.strerror}")
            continue
        for entry in entries:
            _walk_class(layout, found, split, entry)
        for code in CODES:
            if code not in layout.classes_found[split]:
                found.add("missing_class", f"{split}/{code}", f"no folder for class {code} ({BY_CODE[code].english})")
    return layout


def _walk_class(layout: _Layout, found: _Findings, split: str, entry: os.DirEntry[str]) -> None:
    rel = f"{split}/{entry.name}"
    kind = _kind(entry)
    if kind in ("loop", "broken"):
        found.add(f"symlink_{kind}", rel, f"{kind} symbolic link")
        return
    if kind != "dir":
        found.add("ignored_file", rel, "a file directly in the split folder")
        return
    if entry.name not in BY_CODE:
        found.add("unknown_class", rel, f"class folder '{display_path(entry.name)}' is not in the taxonomy")
        return
    layout.classes_found[split].append(entry.name)
    try:
        items = _entries(entry.path)
    except OSError as exc:
        found.add("unreadable_folder", rel, f"cannot list: {exc.strerror}")
        return
    before = len(layout.files)
    for item in items:
        item_rel = f"{rel}/{item.name}"
        item_kind = _kind(item)
        if item_kind == "file" and Path(item.name).suffix.lower() in IMAGE_SUFFIXES:
            layout.files.append((split, entry.name, display_path(item_rel), item.path))
        elif item_kind in ("loop", "broken"):
            found.add(f"symlink_{item_kind}", item_rel, f"{item_kind} symbolic link")
        elif item_kind == "dir":
            found.add("nested_folder", item_rel, "a folder inside a class folder: its files are ignored")
        elif item_kind == "other":
            found.add("ignored_file", item_rel, "not a regular file (fifo, socket or device)")
        elif not item.name.startswith("."):
            found.add("ignored_file", item_rel, f"not an image name ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if len(layout.files) == before:
        found.add("empty_class", rel, f"no image files for class {entry.name} ({BY_CODE[entry.name].english})")


def _check_label_file(root: Path, found: _Findings) -> dict[str, Any]:
    path = root / "label.txt"
    if not path.is_file():
        found.add("no_label_file", "label.txt", "no label.txt at the root")
        return {"path": None}
    try:
        raw = path.read_bytes()
        problems = compare_label_file(path)
    except (OSError, ValueError) as exc:
        found.add("label_file_unreadable", "label.txt", str(exc))
        return {"path": "label.txt", "readable": False}
    for problem in problems:
        found.add("label_file_disagrees", "label.txt", problem)
    encoding = "utf-8" if _decodes(raw, "utf-8-sig") else "gbk"
    return {"path": "label.txt", "readable": True, "encoding": encoding, "disagreements": problems}


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------- one file


def inspect_image(path: str) -> dict[str, Any]:
    """Everything doctor needs to know about one file. Never raises: `status` says what is wrong.

    Runs in worker processes, so it takes and returns plain data.
    """
    record: dict[str, Any] = {"status": "ok", "detail": ""}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        record["status"] = "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
        record["detail"] = f"cannot read: {exc.strerror or exc}"
        return record
    record["bytes"] = len(data)
    if not data:
        record.update(status="zero_byte", detail="empty file (0 bytes)")
        return record
    record["sha256"] = sha256_bytes(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            record.update(format=image.format, mode=image.mode, width=image.width, height=image.height)
            record["orientation"] = _orientation(image)
    except UnidentifiedImageError:
        record.update(status="not_image", detail=f"not an image: {_sniff(data)}")
        return record
    except Exception as exc:  # PIL raises many types on a garbled header (SyntaxError, struct.error...)
        record.update(status="corrupt", detail=f"unreadable image header ({exc})")
        return record
    # Refuse from the header, before a single pixel is decoded.
    if record["width"] * record["height"] > images.MAX_PIXELS:
        limit = f"over the {images.MAX_PIXELS:,}-pixel limit (decompression bomb?)"
        record.update(status="too_large", detail=f"{record['width']}x{record['height']} pixels: {limit}, not decoded")
        return record
    try:
        images.load_rgb(path)
    except images.ImageError as exc:
        cause = str(exc.__cause__ or "").lower()
        truncated = "truncated" in cause or _jpeg_without_end(data, record["format"])
        record.update(status="truncated" if truncated else "corrupt", detail=_strip_path(exc.message, path))
        return record
    except Exception as exc:  # a decoder bug in one file must not stop the whole check
        record.update(status="corrupt", detail=f"decoding failed ({type(exc).__name__}: {exc})")
        return record
    try:
        record["phash"], record["dhash"] = _perceptual_hashes(data)
    except Exception as exc:  # the image decoded above; a failed hash only loses near-duplicate detection
        record["hash_error"] = str(exc)
    return record


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block: exif_transpose in the pipeline ignores it too
        return 1


def _sniff(data: bytes) -> str:
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unknown content starting {head[:8].hex(' ')}"
    if not all(c.isprintable() or c.isspace() for c in text):
        return f"unknown content starting {head[:8].hex(' ')}"
    return f"text {text.strip()[:30]!r}"


def _jpeg_without_end(data: bytes, image_format: str | None) -> bool:
    return image_format == "JPEG" and b"\xff\xd9" not in data[-64:]


def _strip_path(message: str, path: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _perceptual_hashes(data: bytes) -> tuple[str, str]:
    import imagehash

    with Image.open(io.BytesIO(data)) as image:
        # JPEG: decode at 1/2..1/8 scale (DCT scaling); the hashes only look at 32x32 and 9x8 pixels.
        image.draft("L", (64, 64))
        gray = images.to_rgb(ImageOps.exif_transpose(image)).convert("L")
    return str(imagehash.phash(gray)), str(imagehash.dhash(gray))


#: Modules that run native thread pools: a forked child of a process that loaded them can deadlock.
_FORK_UNSAFE_MODULES = ("mindspore", "onnxruntime", "torch", "tensorflow")


def can_fork() -> bool:
    """True when worker processes can be forked safely (no other threads in this process)."""
    return threading.active_count() == 1 and not any(name in sys.modules for name in _FORK_UNSAFE_MODULES)


def _inspect_all(paths: list[str], workers: int, progress: bool) -> tuple[list[dict[str, Any]], int]:
    """The records of `paths`, in order, and the number of processes that made them.

    Workers are forked (they start in milliseconds and need no importable `__main__`); where
    forking is unsafe, or the set is small, the images are inspected in this process: on the
    shared set that takes about 3.5 s instead of 2, well within budget.
    """
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    use_pool = workers > 1 and len(paths) >= INLINE_BELOW and can_fork()
    tqdm.monitor_interval = 0  # no monitor thread
    bar = tqdm(total=len(paths), desc="doctor", unit="img", file=sys.stderr, disable=not progress, leave=False)
    try:
        if use_pool:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                try:
                    for record in pool.map(inspect_image, paths, chunksize=32):
                        records.append(record)
                        bar.update()
                except BrokenProcessPool:  # a worker died (killed for memory?): finish in this process
                    pass
        for path in paths[len(records) :]:
            records.append(inspect_image(path))
            bar.update()
    finally:
        bar.close()
    return records, workers if use_pool else 1


# --------------------------------------------------------------------------- comparisons

Member = tuple[str, str, str]  # (split, class code, relative path) of one file


def _exact_duplicates(groups: dict[str, list[Member]], found: _Findings) -> dict[str, Any]:
    duplicate_groups, conflicts, leakage = [], [], []
    for digest, members in groups.items():
        if len(members) > 1:
            duplicate_groups.append({"sha256": digest, "paths": [m[2] for m in members]})
        first_in_folder: dict[tuple[str, str], str] = {}
        for split, code, rel in members:
            if (split, code) in first_in_folder:
                found.add("duplicate_in_class", rel, f"same bytes as {first_in_folder[split, code]}")
            else:
                first_in_folder[split, code] = rel
        codes = sorted({m[1] for m in members})
        if len(codes) > 1:
            conflicts.append({"sha256": digest, "classes": codes, "paths": [m[2] for m in members]})
            for _, _, rel in members:
                found.add("label_conflict", rel, f"the same bytes are filed under classes {', '.join(codes)}")
        train = [m[2] for m in members if m[0] == "train"]
        for split, _, rel in members:
            if split != "train" and train:
                leakage.append({"path": rel, "train": train})
                more = f" and {len(train) - 3} more" if len(train) > 3 else ""
                found.add("leakage", rel, f"also in training as {', '.join(train[:3])}{more}")
    return {
        "method": "sha256 of the file bytes",
        "groups": sorted(duplicate_groups, key=lambda g: g["paths"][0]),
        "redundant_files": sum(len(g["paths"]) - 1 for g in duplicate_groups),
        "label_conflicts": conflicts,
        "leakage": sorted(leakage, key=lambda item: item["path"]),
    }


def _popcount64(values: np.ndarray) -> np.ndarray:
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.int32)


def _near_pairs(phashes: np.ndarray, dhashes: np.ndarray, block: int = 256) -> list[tuple[int, int, int, int]]:
    """(i, j, pHash distance, dHash distance) for every i < j within both thresholds."""
    pairs = []
    for start in range(0, len(phashes), block):
        distances = _popcount64(phashes[start : start + block, None] ^ phashes[None, :])
        for row, j in zip(*np.nonzero(distances <= NEAR_PHASH_MAX), strict=True):
            i = start + int(row)
            if j > i:
                dhash_distance = bin(int(dhashes[i] ^ dhashes[j])).count("1")
                if dhash_distance <= NEAR_DHASH_MAX:
                    pairs.append((i, int(j), int(distances[row, j]), dhash_distance))
    return pairs


def _pair_kind(a: list[Member], b: list[Member]) -> tuple[str, str, str]:
    """The kind of a near-duplicate pair of content groups, and the two paths that show it best."""
    for x in a:
        for y in b:
            if x[1] != y[1]:
                return "across_classes", y[2], x[2]
    for x in a:
        for y in b:
            if x[0] != y[0]:  # name the non-training file first: that is the one to move or remove
                return ("across_splits", x[2], y[2]) if y[0] == "train" else ("across_splits", y[2], x[2])
    return "in_class", b[0][2], a[0][2]


def _near_duplicates(
    groups: dict[str, list[Member]], records: list[dict[str, Any]], found: _Findings
) -> dict[str, Any]:
    hashes = {r["sha256"]: (r["phash"], r["dhash"]) for r in records if r.get("phash")}
    digests = sorted(hashes, key=lambda digest: groups[digest][0][2])
    phashes = np.array([int(hashes[d][0], 16) for d in digests], dtype=np.uint64)
    dhashes = np.array([int(hashes[d][1], 16) for d in digests], dtype=np.uint64)
    pairs = []
    counts = dict.fromkeys(("across_classes", "across_splits", "in_class"), 0)
    for i, j, phash_distance, dhash_distance in _near_pairs(phashes, dhashes):
        a, b = groups[digests[i]], groups[digests[j]]
        kind, shown, like = _pair_kind(a, b)
        counts[kind] += 1
        pairs.append(
            {
                "kind": kind,
                "a": [m[2] for m in a],
                "b": [m[2] for m in b],
                "phash_distance": phash_distance,
                "dhash_distance": dhash_distance,
            }
        )
        found.add(
            f"near_duplicate_{kind}", shown, f"looks like {like} (pHash {phash_distance}, dHash {dhash_distance})"
        )
    return {
        "method": "64-bit pHash and dHash of the decoded, oriented image; Hamming distances",
        "thresholds": {"phash": NEAR_PHASH_MAX, "dhash": NEAR_DHASH_MAX},
        "compared": len(digests),
        "counts": counts,
        "pairs": sorted(pairs, key=lambda p: (p["a"][0], p["b"][0])),
    }


# --------------------------------------------------------------------------- summaries


def _counts(layout: _Layout, records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """split -> class -> files (image names), usable (decodable) and distinct (different contents)."""
    counts = {
        split: {code: {"files": 0, "usable": 0, "distinct": 0} for code in layout.classes_found[split]}
        for split in layout.splits_found
    }
    digests: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (split, code, _, _), record in zip(layout.files, records, strict=True):
        counts[split][code]["files"] += 1
        if record["status"] == "ok":
            counts[split][code]["usable"] += 1
            digests[split, code].add(record["sha256"])
    for (split, code), distinct in digests.items():
        counts[split][code]["distinct"] = len(distinct)
    return counts


def _imbalance(counts: dict[str, dict[str, dict[str, int]]], found: _Findings) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for split, per_class in counts.items():
        if not per_class:
            continue
        files = [c["files"] for c in per_class.values()]
        distinct = [c["distinct"] for c in per_class.values()]
        median = statistics.median(distinct)
        summary[split] = {
            "files": {"min": min(files), "max": max(files)},
            "distinct": {"min": min(distinct), "max": max(distinct), "median": median},
            "max_over_min_distinct": round(max(distinct) / max(min(distinct), 1), 2),
        }
        for code, c in per_class.items():
            if c["distinct"] and c["distinct"] < UNDERREPRESENTED_FRACTION * median:
                found.add(
                    "underrepresented_class",
                    f"{split}/{code}",
                    f"{code} ({BY_CODE[code].english}): {c['distinct']} distinct images in {c['files']} files; "
                    f"the {split} median is {median:g}",
                )
    return summary


def _image_summary(layout: _Layout, records: list[dict[str, Any]], found: _Findings) -> dict[str, Any]:
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    rotated, widths, heights = [], [], []
    for (_, _, rel, _), record in zip(layout.files, records, strict=True):
        if record["status"] != "ok":
            found.add(record["status"], rel, record["detail"])
            continue
        formats[record["format"]] += 1
        modes[record["mode"]] += 1
        sizes[f"{record['width']}x{record['height']}"] += 1
        widths.append(record["width"])
        heights.append(record["height"])
        if record["mode"] != "RGB":
            found.add("non_rgb_mode", rel, f"mode {record['mode']}: {_mode_action(record['mode'])}")
        if record["orientation"] not in (0, 1):
            rotated.append(rel)
            found.add("exif_rotated", rel, f"EXIF orientation {record['orientation']}")
        if min(record["width"], record["height"]) < SMALL_SIDE:
            found.add("small_image", rel, f"{record['width']}x{record['height']}: upscaled to 224 px")
    return {
        "files": len(records),
        "usable": len(widths),
        "bytes": sum(record.get("bytes", 0) for record in records),
        "status": dict(Counter(record["status"] for record in records).most_common()),
        "formats": dict(formats.most_common()),
        "modes": {mode: {"count": n, "pipeline": _mode_action(mode)} for mode, n in modes.most_common()},
        "sizes": dict(sizes.most_common(20)),
        "distinct_sizes": len(sizes),
        "width": {"min": min(widths), "max": max(widths)} if widths else None,
        "height": {"min": min(heights), "max": max(heights)} if heights else None,
        "exif_rotated": rotated,
    }


def _mode_action(mode: str) -> str:
    return MODE_ACTIONS.get(mode, "converted with PIL's convert('RGB')")


def run_doctor(root: Path, *, strict: bool = False, workers: int = 2, progress: bool = False) -> DoctorReport:
    """Check the data set at `root`. Raises `EdgeBuildError` (exit 2) only when it cannot be read at all.

    `workers` processes read, decode and hash the images (in-process for small sets);
    `progress` shows a progress bar on stderr.
    """
    started = time.perf_counter()
    root = Path(root)
    found = _Findings()
    layout = _walk(root, found)
    label_file = _check_label_file(root, found)
    workers = max(1, min(workers, os.cpu_count() or 1))
    records, workers = _inspect_all([entry[3] for entry in layout.files], workers, progress)
    image_summary = _image_summary(layout, records, found)
    groups: dict[str, list[Member]] = defaultdict(list)
    for (split, code, rel, _), record in zip(layout.files, records, strict=True):
        if record["status"] == "ok":
            groups[record["sha256"]].append((split, code, rel))
    duplicates = _exact_duplicates(groups, found)
    near_duplicates = _near_duplicates(groups, records, found)
    counts = _counts(layout, records)
    imbalance = _imbalance(counts, found)
    return DoctorReport(
        root=root.absolute(),
        strict=strict,
        splits_found=layout.splits_found,
        extra_folders=layout.extra_folders,
        classes_found=layout.classes_found,
        counts=counts,
        label_file=label_file,
        images=image_summary,
        imbalance=imbalance,
        duplicates=duplicates,
        near_duplicates=near_duplicates,
        findings=found.findings(),
        elapsed_s=time.perf_counter() - started,
        workers=workers,
    )
