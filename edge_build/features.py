"""Stage `features`: pooled 1280-d backbone features of every image, cached by content.

The cache is a content-addressed store: build/features/cache/<key>/ where <key>
fingerprints the weights (sha256), the preprocessing, the padding and the runtime.
Inside, shards `<sha256 of the shard>.npz` map image sha256 -> feature (+ the decoded
pixels' sha256 and perceptual hashes used for duplicate-aware folds). A shard's name is
its own hash, so a damaged shard is detected on load, deleted, and its images are
recomputed. Adding, removing or changing an image computes only that image (one new
shard); changing the weights changes <key>, so everything is recomputed.

The assembled per-split arrays (build/features/set/<split>.npz) are a `run_stage`
output keyed by the list of (image, sha256) and the store key.

Runtime: the MindSpore forward pass of the backbone is several times slower on this
CPU than ONNX Runtime on the exported backbone, so bulk extraction runs the exported
backbone in ONNX Runtime after checking it against the MindSpore network on real
images (cosine >= PARITY_MIN_COSINE); `FeatureSet.runtime` says which produced them.
"""

from __future__ import annotations

import io
import json
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import atomic
from edge_build.dataset import ImageRef, list_split
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.hashing import fingerprint, sha256_bytes, sha256_file
from edge_build.images import load_rgb
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.weights import ImportedWeights

#: Bump when what a cached feature means changes (pooling, dtype, hashing of pixels...).
FEATURE_VERSION = 1
RUNTIMES = ("auto", "onnxruntime", "mindspore")
PARITY_MIN_COSINE = 0.9999
PARITY_SAMPLE = 16
BATCH_SIZE = 32
#: Computed features are written to a new shard every this many images, so a killed
#: extraction keeps most of its work; more shards than MAX_SHARDS are merged into one.
FLUSH_EVERY = 512
MAX_SHARDS = 8
FEATURES_DIM = 1280
SET_INFO = "features.json"
#: What np.load(..., allow_pickle=False) raises for bytes that are not a clean .npz (pickles included).
NPZ_ERRORS = (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class SplitFeatures:
    """The features of one split, row i belonging to image keys[i]."""

    split: str
    features: np.ndarray  # (N, 1280) float32
    labels: np.ndarray  # (N,) int64 class index
    keys: list[str]  # "split/class/file"
    sha256: list[str]  # file bytes
    pixel_sha256: list[str]  # decoded RGB pixels (re-encodings of one image share it)
    phash: np.ndarray  # (N,) uint64
    dhash: np.ndarray  # (N,) uint64

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class FeatureSet:
    splits: dict[str, SplitFeatures]
    runtime: str
    key: str  # fingerprint of weights + preprocessing + padding + runtime
    directory: Path
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, split: str) -> SplitFeatures:
        if split not in self.splits:
            raise EdgeBuildError(f"no features for split '{split}'", "run `edge-build features` on a data set with it")
        return self.splits[split]

    def content_hash(self, split: str) -> str:
        """sha256 of one split's assembled feature file: the identity of that split's features."""
        return sha256_file(self.directory / f"{split}.npz")


# --------------------------------------------------------------------------- the store


def _unicode(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype="<U64")


def _encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@dataclass
class _Entry:
    feature: np.ndarray
    pixel_sha256: str
    phash: int
    dhash: int


class FeatureStore:
    """build/features/cache/<key>/<shard sha256>.npz: image sha256 -> feature and hashes."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.damaged: list[str] = []

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob("*.npz")) if self.directory.is_dir() else []

    def load(self) -> dict[str, Any]:
        """Every entry of every intact shard; a damaged shard is noted in `damaged` and deleted."""
        entries: dict[str, Any] = {}
        for shard in self.shards():
            data = shard.read_bytes()
            try:
                if sha256_bytes(data) != shard.stem:
                    raise ValueError("content does not match its name")
                with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                    decoded = self._decode(npz)
            except NPZ_ERRORS as exc:
                self.damaged.append(f"{shard.name} ({exc})")
                shard.unlink(missing_ok=True)
                continue
            entries.update(decoded)
        return entries

    def _decode(self, npz: Any) -> dict[str, Any]:
        """One shard's entries; ValueError when its arrays are not what `write` stores."""
        shas, feats = npz["sha256"], npz["features"]
        pixels, phash, dhash = npz["pixel_sha256"], npz["phash"], npz["dhash"]
        if feats.dtype != np.float32 or feats.ndim != 2 or not len(shas) == len(feats) == len(phash):
            raise ValueError("unexpected shapes")
        return {
            sha: _Entry(feats[i], pixels[i].item(), int(phash[i]), int(dhash[i])) for i, sha in enumerate(shas.tolist())
        }

    def write(self, entries: dict[str, _Entry]) -> Path:
        shas = sorted(entries)
        data = _encode_npz(
            {
                "sha256": _unicode(shas),
                "features": np.stack([entries[s].feature for s in shas]).astype(np.float32),
                "pixel_sha256": _unicode([entries[s].pixel_sha256 for s in shas]),
                "phash": np.asarray([entries[s].phash for s in shas], dtype=np.uint64),
                "dhash": np.asarray([entries[s].dhash for s in shas], dtype=np.uint64),
            }
        )
        return atomic.write_bytes(self.directory / f"{sha256_bytes(data)}.npz", data)

    def compact(self, keep: dict[str, _Entry]) -> None:
        """Replace every shard by one holding exactly `keep` (drops images no longer in the data)."""
        merged = self.write(keep)
        for shard in self.shards():
            if shard != merged:
                shard.unlink(missing_ok=True)
        for leftover in self.directory.glob(".*.tmp"):  # from a writer killed mid-write
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- runtimes


def _sample_for_parity(refs: list[tuple[ImageRef, str]]) -> list[tuple[ImageRef, str]]:
    """The PARITY_SAMPLE images with the smallest sha256: spread at random, and stable when one image changes."""
    unique: dict[str, ImageRef] = {}
    for ref, sha in refs:
        unique.setdefault(sha, ref)
    return [(unique[sha], sha) for sha in sorted(unique)[:PARITY_SAMPLE]]


def _prepare_onnx_backbone(
    weights: ImportedWeights, build_dir: Path, sample: list[tuple[ImageRef, str]], log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """Export the backbone to ONNX and check it against MindSpore on real images (cached)."""
    pre = weights.preprocessing
    directory = Path(build_dir) / "features" / "backbone" / f"{weights.sha256[:16]}-{pre.size}"
    inputs = {
        "weights_sha256": weights.sha256,
        "padding": weights.padding,
        "preprocessing": pre.as_dict(),
        "sample": sorted(sha for _, sha in sample),
        "min_cosine": PARITY_MIN_COSINE,
    }

    def produce(out: Path) -> dict[str, Any]:
        from edge_build.export import export_backbone_onnx
        from edge_build.runners import MindSporeRunner, OnnxRunner

        _cap_threads()
        backbone = weights.load_backbone(fold_bn=True)
        onnx_path = export_backbone_onnx(backbone, out / "backbone.onnx", size=pre.size)
        batch = pre.prepare_batch([ref.path for ref, _ in sample])
        reference = MindSporeRunner(backbone).run(batch)
        candidate = OnnxRunner(onnx_path, threads=_threads()).run(batch)
        return write_sample_parity(out / "parity.json", reference, candidate, [ref.key for ref, _ in sample])

    result = run_stage("features-backbone", directory, inputs, produce)
    return directory / "backbone.onnx", result.info


def write_sample_parity(path: Path, reference: np.ndarray, candidate: np.ndarray, keys: list[str]) -> dict[str, Any]:
    """The check that lets an exported graph stand in for MindSpore: per-image cosine on real images."""
    flat_ref, flat_cand = reference.reshape(len(keys), -1), candidate.reshape(len(keys), -1)
    cosine = np.sum(flat_ref * flat_cand, axis=1) / (
        np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1) + 1e-12
    )
    parity = {
        "images": keys,
        "min_cosine": float(cosine.min()),
        "max_abs": float(np.abs(reference - candidate).max()),
        "threshold": PARITY_MIN_COSINE,
        "passed": bool(cosine.min() >= PARITY_MIN_COSINE),
    }
    atomic.write_json(path, parity)
    return parity


def _threads() -> int:
    from edge_build.msenv import threads

    return threads()


def _cap_threads() -> None:
    from edge_build.msenv import mindspore_module
    from edge_build.training import cap_cpu_threads

    cap_cpu_threads(mindspore_module())


class _Extractor:
    """Runs preprocessed batches through the chosen runtime (created on first use)."""

    def __init__(self, runtime: str, weights: ImportedWeights, onnx_path: Path | None) -> None:
        self.runtime = runtime
        self.weights = weights
        self.onnx_path = onnx_path
        self._runner: Any = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._runner is None:
            from edge_build.runners import MindSporeRunner, OnnxRunner

            if self.runtime == "onnxruntime":
                assert self.onnx_path is not None
                # No spin-waiting: it burns the cores the decode thread (and, here, colleagues) need.
                self._runner = OnnxRunner(self.onnx_path, threads=_threads(), spinning=False)
            else:
                _cap_threads()
                self._runner = MindSporeRunner(self.weights.load_backbone(fold_bn=True))
        out = self._runner.run(batch)
        if out.shape != (len(batch), FEATURES_DIM):
            raise EdgeBuildError(f"the backbone returned shape {out.shape}, expected ({len(batch)}, {FEATURES_DIM})")
        return out


def _resolve_runtime(
    runtime: str,
    weights: ImportedWeights,
    build_dir: Path,
    refs: list[tuple[ImageRef, str]],
    log: Callable[[str], None],
) -> tuple[str, Path | None, dict[str, Any] | None]:
    if runtime not in RUNTIMES:
        raise EdgeBuildError(f"unknown feature runtime '{runtime}'", f"choose one of {', '.join(RUNTIMES)}")
    if runtime == "mindspore":
        return "mindspore", None, None
    try:
        onnx_path, parity = _prepare_onnx_backbone(weights, build_dir, _sample_for_parity(refs), log)
    except EdgeBuildError as exc:
        if runtime == "onnxruntime":
            raise
        log(f"warning: could not export the backbone to ONNX ({exc}); extracting with MindSpore (slower)")
        return "mindspore", None, None
    if not parity["passed"]:
        message = (
            f"the ONNX backbone differs from the MindSpore network on real images "
            f"(min cosine {parity['min_cosine']:.6f} < {PARITY_MIN_COSINE})"
        )
        if runtime == "onnxruntime":
            raise CheckFailed(message, "use --runtime mindspore")
        log(f"warning: {message}; extracting with MindSpore (slower)")
        return "mindspore", None, parity
    return "onnxruntime", onnx_path, parity


# --------------------------------------------------------------------------- the stage


def _list_images(data_root: Path, splits: Sequence[str]) -> dict[str, list[tuple[ImageRef, str]]]:
    listing: dict[str, list[tuple[ImageRef, str]]] = {}
    for split in splits:
        refs = list_split(Path(data_root), split)
        listing[split] = [(ref, sha256_file(ref.path)) for ref in refs]
    return listing


@dataclass
class _Prepared:
    inputs: np.ndarray  # (n, 3, H, W) float32, preprocessed
    pixels: list[str]
    hashes: list[tuple[int, int]]


def _prepare(chunk: list[tuple[ImageRef, str]], weights: ImportedWeights) -> _Prepared:
    """Decode, hash and preprocess one batch (runs in a helper thread: PIL and NumPy release the GIL)."""
    from edge_build.folds import perceptual_hashes

    pre = weights.preprocessing
    pixels, hashes, inputs = [], [], []
    for ref, _ in chunk:
        rgb = load_rgb(ref.path)
        pixels.append(sha256_bytes(f"{rgb.shape}".encode() + rgb.tobytes()))
        hashes.append(perceptual_hashes(rgb))
        inputs.append(pre.normalize(pre.resize_rgb(rgb)))
    return _Prepared(np.stack(inputs), pixels, hashes)


def _compute(
    todo: list[tuple[ImageRef, str]],
    extractor: _Extractor,
    weights: ImportedWeights,
    progress: bool,
    store: FeatureStore | None = None,
) -> dict[str, _Entry]:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    chunks = [todo[start : start + BATCH_SIZE] for start in range(0, len(todo), BATCH_SIZE)]
    computed: dict[str, _Entry] = {}
    unsaved: dict[str, _Entry] = {}
    bar = tqdm(
        total=len(todo),
        desc="features",
        unit="img",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
        leave=False,
    )
    # The next batch is decoded while the backbone runs on the current one.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-build-decode") as pool:
        pending = pool.submit(_prepare, chunks[0], weights) if chunks else None
        try:
            for index, chunk in enumerate(chunks):
                assert pending is not None
                prepared = pending.result()
                pending = pool.submit(_prepare, chunks[index + 1], weights) if index + 1 < len(chunks) else None
                features = extractor.run(prepared.inputs)
                rows = zip(chunk, prepared.pixels, prepared.hashes, features, strict=True)
                for (_, sha), pixel, (phash, dhash), feature in rows:
                    entry = _Entry(np.asarray(feature, dtype=np.float32), pixel, phash, dhash)
                    computed[sha] = unsaved[sha] = entry
                if store is not None and len(unsaved) >= FLUSH_EVERY:
                    store.write(unsaved)
                    unsaved = {}
                bar.update(len(chunk))
            if store is not None and unsaved:
                store.write(unsaved)
        finally:
            if pending is not None:
                pending.cancel()
            bar.close()
    return computed


def _assemble(split: str, refs: list[tuple[ImageRef, str]], entries: dict[str, _Entry]) -> dict[str, np.ndarray]:
    rows = [entries[sha] for _, sha in refs]
    return {
        "features": np.stack([e.feature for e in rows]).astype(np.float32),
        "labels": np.asarray([ref.label for ref, _ in refs], dtype=np.int64),
        "keys": np.asarray([ref.key for ref, _ in refs]),
        "sha256": _unicode([sha for _, sha in refs]),
        "pixel_sha256": _unicode([e.pixel_sha256 for e in rows]),
        "phash": np.asarray([e.phash for e in rows], dtype=np.uint64),
        "dhash": np.asarray([e.dhash for e in rows], dtype=np.uint64),
    }


def _read_split(path: Path, split: str) -> SplitFeatures:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return SplitFeatures(
                split=split,
                features=npz["features"],
                labels=npz["labels"],
                keys=npz["keys"].tolist(),
                sha256=npz["sha256"].tolist(),
                pixel_sha256=npz["pixel_sha256"].tolist(),
                phash=npz["phash"],
                dhash=npz["dhash"],
            )
    except NPZ_ERRORS as exc:
        raise EdgeBuildError(f"{path}: unreadable feature file ({exc})", "run `edge-build features` again") from exc


def extract_features(
    data_root: Path,
    weights: ImportedWeights,
    build_dir: Path,
    splits: Sequence[str] = ("train", "val"),
    progress: bool = True,
    runtime: str = "auto",
    log: Callable[[str], None] | None = None,
    set_dir: Path | None = None,
) -> FeatureSet:
    """Features of every image of `splits`, computing only images the cache does not hold.

    The per-split arrays go to `set_dir` (default build/features/set, what `load_features` reads).
    """
    log = log or (lambda message: None)
    listing = _list_images(Path(data_root), splits)
    every = [item for split in splits for item in listing[split]]
    runtime, onnx_path, parity = _resolve_runtime(runtime, weights, Path(build_dir), every, log)
    pre = weights.preprocessing
    key_payload = {
        "weights_sha256": weights.sha256,
        "preprocessing": pre.as_dict(),
        "padding": weights.padding,
        "runtime": runtime,
        "version": FEATURE_VERSION,
    }
    key = fingerprint(key_payload)
    store = FeatureStore(Path(build_dir) / "features" / "cache" / key[:16])
    set_dir = Path(set_dir) if set_dir is not None else Path(build_dir) / "features" / "set"
    inputs = {
        "key": key,
        "splits": {split: [[ref.key, sha] for ref, sha in listing[split]] for split in splits},
    }

    def produce(out: Path) -> dict[str, Any]:
        started = time.perf_counter()
        atomic.write_json(store.directory / "key.json", key_payload)
        entries = store.load()
        for damaged in store.damaged:
            log(f"warning: damaged feature cache shard {damaged} removed; its images are recomputed")
        wanted = {sha: ref for ref, sha in every}
        todo = [(ref, sha) for sha, ref in wanted.items() if sha not in entries]
        computed: dict[str, _Entry] = {}
        if todo:
            computed = _compute(todo, _Extractor(runtime, weights, onnx_path), weights, progress, store)
            entries.update(computed)
        seconds = time.perf_counter() - started
        if len(store.shards()) > MAX_SHARDS:
            store.compact({sha: entries[sha] for sha in wanted})
        for split in splits:
            atomic.write_npz(out / f"{split}.npz", **_assemble(split, listing[split], entries))
        info = {
            "runtime": runtime,
            "key": key,
            "weights_sha256": weights.sha256,
            "preprocessing": pre.as_dict(),
            "counts": {split: len(listing[split]) for split in splits},
            "unique_images": len(wanted),
            "computed": len(computed),
            "reused": len(wanted) - len(computed),
            "damaged_shards": list(store.damaged),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(computed) / seconds, 1) if computed and seconds > 0 else None,
            "parity": parity,
        }
        atomic.write_json(out / SET_INFO, info)
        return info

    result = run_stage("features", set_dir, inputs, produce)
    return FeatureSet(
        splits={split: _read_split(set_dir / f"{split}.npz", split) for split in splits},
        runtime=runtime,
        key=key,
        directory=set_dir,
        info={**result.info, "ran": result.ran},
    )


def load_features(build_dir: Path, splits: Sequence[str] = ("train", "val")) -> FeatureSet:
    """The feature set the last `edge-build features` wrote (no data set or weights needed)."""
    set_dir = Path(build_dir) / "features" / "set"
    try:
        info = json.loads((set_dir / SET_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"no features in {set_dir}", "run `edge-build features` first") from exc
    return FeatureSet(
        splits={split: _read_split(set_dir / f"{split}.npz", split) for split in splits},
        runtime=str(info.get("runtime", "unknown")),
        key=str(info.get("key", "")),
        directory=set_dir,
        info=info,
    )
