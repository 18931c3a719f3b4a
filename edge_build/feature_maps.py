"""The frozen part's output per image and per augmented view, cached by content.

Fine-tuning the last K stages of the backbone only needs, for every training view, the
feature map entering the first trainable stage (`stages[start]`, start = 19 - K): the
frozen stages never change, so their output is computed once and an epoch runs only
the trainable stages.

The cache follows the pooled-feature cache (`edge_build.features.FeatureStore`, which
`MapStore` extends): build/finetune/maps/<key>/<shard sha256>.npz, <key> fingerprinting
the weights, preprocessing, padding, the first trainable stage and the runtime. Inside,
an entry is named by what determines its pixels: `<image sha256>:<view tag>`, the tag
being "0" for the image itself and a fingerprint of (seed, view index, augmentation)
otherwise. Changing the number of views computes only the new views; changing the
augmentation or the seed computes new views and reuses the originals; a damaged shard
is detected by its name, removed and recomputed. Maps are stored as float16 (half the
memory and disk; the rounding, <= 5e-4 relative, is far below the augmentation noise).

Runtime: the frozen stages are exported to ONNX and run in ONNX Runtime after a parity
check against MindSpore on real images (like the pooled features), else in MindSpore.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import atomic, network
from edge_build.augment import Augmentation, augment_view
from edge_build.dataset import ImageRef
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.features import PARITY_MIN_COSINE, FeatureStore, _encode_npz, write_sample_parity
from edge_build.hashing import fingerprint, sha256_bytes
from edge_build.images import load_rgb
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.weights import ImportedWeights

#: Bump when what a cached map means changes.
MAPS_VERSION = 1
RUNTIMES = ("auto", "onnxruntime", "mindspore")
PARITY_SAMPLE = 8
BATCH_IMAGES = 8  # images per frozen-part batch (x views each)
FLUSH_EVERY = 512  # entries per new shard while computing
MAX_SHARDS = 16
STORE_DTYPE = np.float16


def map_shape(start: int) -> tuple[int, int, int]:
    """(C, H, W) of the feature map entering stages[start] (0 = the preprocessed image, 19 = the pooled input)."""
    if not 0 <= start <= network.NUM_STAGES:
        raise EdgeBuildError(f"no feature map before stage {start}", f"choose 0..{network.NUM_STAGES}")
    if start == 0:
        return 3, network.INPUT_SIZE, network.INPUT_SIZE
    size, channels = network.INPUT_SIZE // 2, network.STEM_CHANNELS
    for index, block in enumerate(network.block_specs(), start=1):
        if index >= start:
            return channels, size, size
        size //= block.stride
        channels = block.out_channels
    return (channels if start < network.NUM_STAGES else network.FEATURES), size, size


def view_tag(view: int, seed: int, aug: Augmentation) -> str:
    """The name of a view's content: "0" for the image itself, else a fingerprint of how it was drawn."""
    if view == 0:
        return "0"
    return fingerprint({"view": view, "seed": seed, "augmentation": aug.as_dict()})[:16]


class MapStore(FeatureStore):
    """build/finetune/maps/<key>/<shard sha256>.npz: `<image sha256>:<view tag>` -> float16 map."""

    def _decode(self, npz: Any) -> dict[str, np.ndarray]:
        names, maps = npz["entry"], npz["maps"]
        if maps.dtype != STORE_DTYPE or maps.ndim != 4 or len(names) != len(maps):
            raise ValueError("unexpected shapes")
        return dict(zip(names.tolist(), maps, strict=True))

    def write(self, entries: dict[str, np.ndarray]) -> Path:  # type: ignore[override]
        names = sorted(entries)
        data = _encode_npz(
            {
                "entry": np.asarray(names, dtype="<U96"),
                "maps": np.stack([entries[n] for n in names]).astype(STORE_DTYPE),
            }
        )
        return atomic.write_bytes(self.directory / f"{sha256_bytes(data)}.npz", data)


@dataclass
class FeatureMaps:
    """Maps of one set of images: maps[i, v] is view v of image keys[i] (float16, (N, V, C, H, W))."""

    start: int
    maps: np.ndarray
    labels: np.ndarray
    keys: list[str]
    sha256: list[str]
    runtime: str
    key: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def views(self) -> int:
        return int(self.maps.shape[1])


# --------------------------------------------------------------------------- the frozen part


def frozen_cell(weights: ImportedWeights, start: int) -> Any:
    """Inference cell image -> the map entering stages[start] (BatchNorm folded)."""
    ms = network._cells().ms

    class FrozenPart(ms.nn.Cell):
        def __init__(self, backbone: Any, stop: int) -> None:
            super().__init__()
            self.backbone = backbone
            self.stop = stop

        def construct(self, x):
            return self.backbone.forward_stages(x, 0, self.stop)

    cell = FrozenPart(weights.load_backbone(fold_bn=True), start)
    cell.set_train(False)
    return cell


def _prepare_onnx(
    weights: ImportedWeights, build_dir: Path, start: int, sample: list[ImageRef]
) -> tuple[Path, dict[str, Any]]:
    """Export the frozen stages to ONNX and check them against MindSpore on real images.

    Cached per weights and first trainable stage; the sample is not part of the key (any
    real images check the export), so the validation split reuses the training split's check.
    """
    directory = Path(build_dir) / "finetune" / "frozen" / f"{weights.sha256[:16]}-s{start}"
    inputs = {
        "weights_sha256": weights.sha256,
        "padding": weights.padding,
        "start": start,
        "min_cosine": PARITY_MIN_COSINE,
        "version": MAPS_VERSION,
    }

    def produce(out: Path) -> dict[str, Any]:
        from edge_build.export import export_onnx
        from edge_build.runners import OnnxRunner

        cell = frozen_cell(weights, start)
        onnx_path = export_onnx(cell, out / "frozen.onnx", weights.preprocessing.size, output_name="feature_map")
        batch = weights.preprocessing.prepare_batch([ref.path for ref in sample])
        reference = cell(network._cells().ms.Tensor(batch)).asnumpy()
        candidate = OnnxRunner(onnx_path, threads=_threads(), spinning=False).run(batch)
        return write_sample_parity(out / "parity.json", reference, candidate, [ref.key for ref in sample])

    result = run_stage("finetune-frozen", directory, inputs, produce)
    return directory / "frozen.onnx", result.info


def _threads() -> int:
    from edge_build.msenv import threads

    return threads()


class _FrozenRunner:
    def __init__(self, runtime: str, weights: ImportedWeights, start: int, onnx_path: Path | None) -> None:
        self.runtime, self.weights, self.start, self.onnx_path = runtime, weights, start, onnx_path
        self._runner: Any = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.runtime == "identity":
            return batch
        if self._runner is None:
            from edge_build.runners import MindSporeRunner, OnnxRunner

            if self.runtime == "onnxruntime":
                assert self.onnx_path is not None
                self._runner = OnnxRunner(self.onnx_path, threads=_threads(), spinning=False)
            else:
                self._runner = MindSporeRunner(frozen_cell(self.weights, self.start))
        return self._runner.run(batch)


def _resolve_runtime(
    runtime: str,
    weights: ImportedWeights,
    build_dir: Path,
    start: int,
    refs: list[ImageRef],
    log: Callable[[str], None],
) -> tuple[str, Path | None, dict[str, Any] | None]:
    if runtime not in RUNTIMES:
        raise EdgeBuildError(f"unknown feature-map runtime '{runtime}'", f"choose one of {', '.join(RUNTIMES)}")
    if start == 0:  # the whole backbone trains: the "map" is the preprocessed view itself
        return "identity", None, None
    if runtime == "mindspore":
        return "mindspore", None, None
    sample = sorted(refs, key=lambda ref: ref.key)[:: max(1, len(refs) // PARITY_SAMPLE)][:PARITY_SAMPLE]
    try:
        onnx_path, parity = _prepare_onnx(weights, build_dir, start, sample)
    except EdgeBuildError as exc:
        if runtime == "onnxruntime":
            raise
        log(f"warning: could not export the frozen stages to ONNX ({exc}); running them in MindSpore (slower)")
        return "mindspore", None, None
    if not parity["passed"]:
        message = f"the ONNX frozen stages differ from MindSpore on real images (min cosine {parity['min_cosine']:.6f})"
        if runtime == "onnxruntime":
            raise CheckFailed(message, "use the mindspore runtime")
        log(f"warning: {message}; running them in MindSpore (slower)")
        return "mindspore", None, parity
    return "onnxruntime", onnx_path, parity


# --------------------------------------------------------------------------- computing


def _decode_views(
    jobs: list[tuple[ImageRef, str, list[int]]], seed: int, aug: Augmentation, weights: ImportedWeights
) -> np.ndarray:
    """Decode, augment and preprocess one batch (helper thread: PIL and NumPy release the GIL)."""
    pre = weights.preprocessing
    inputs = []
    for ref, sha, views in jobs:
        rgb = load_rgb(ref.path)
        inputs.extend(pre.apply(augment_view(rgb, sha, view, seed, aug)) for view in views)
    return np.stack(inputs)


def _compute(
    jobs: list[tuple[ImageRef, str, list[int]]],
    tags: dict[int, str],
    runner: _FrozenRunner,
    store: MapStore,
    seed: int,
    aug: Augmentation,
    weights: ImportedWeights,
    progress: bool,
) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    chunks = [jobs[i : i + BATCH_IMAGES] for i in range(0, len(jobs), BATCH_IMAGES)]
    computed: dict[str, np.ndarray] = {}
    unsaved: dict[str, np.ndarray] = {}
    bar = tqdm(
        total=sum(len(views) for _, _, views in jobs),
        desc="frozen maps",
        unit="view",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
        leave=False,
    )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-build-augment") as pool:
        pending = pool.submit(_decode_views, chunks[0], seed, aug, weights) if chunks else None
        try:
            for index, chunk in enumerate(chunks):
                assert pending is not None
                batch = pending.result()
                following = chunks[index + 1] if index + 1 < len(chunks) else None
                pending = pool.submit(_decode_views, following, seed, aug, weights) if following else None
                out = runner.run(batch).astype(STORE_DTYPE)
                names = [f"{sha}:{tags[view]}" for _, sha, views in chunk for view in views]
                for name, value in zip(names, out, strict=True):
                    computed[name] = unsaved[name] = value
                if len(unsaved) >= FLUSH_EVERY:
                    store.write(unsaved)
                    unsaved = {}
                bar.update(len(names))
            if unsaved:
                store.write(unsaved)
        finally:
            if pending is not None:
                pending.cancel()
            bar.close()
    return computed


def frozen_maps(
    items: Sequence[tuple[ImageRef, str]],
    weights: ImportedWeights,
    build_dir: Path,
    start: int,
    views: int,
    seed: int,
    augmentation: Augmentation,
    runtime: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FeatureMaps:
    """The maps entering stages[start] of `views` views of every (image, sha256), computing only new ones."""
    log = log or (lambda message: None)
    augmentation.validate()
    shape = map_shape(start)
    refs = [ref for ref, _ in items]
    runtime, onnx_path, parity = _resolve_runtime(runtime, weights, Path(build_dir), start, refs, log)
    key_payload = {
        "weights_sha256": weights.sha256,
        "preprocessing": weights.preprocessing.as_dict(),
        "padding": weights.padding,
        "start": start,
        "runtime": runtime,
        "dtype": np.dtype(STORE_DTYPE).name,
        "version": MAPS_VERSION,
    }
    key = fingerprint(key_payload)
    store = MapStore(Path(build_dir) / "finetune" / "maps" / key[:16])
    started = time.perf_counter()
    atomic.write_json(store.directory / "key.json", key_payload)
    entries = store.load()
    for damaged in store.damaged:
        log(f"warning: damaged feature-map cache shard {damaged} removed; its views are recomputed")
    tags = {view: view_tag(view, seed, augmentation) for view in range(views)}
    jobs: list[tuple[ImageRef, str, list[int]]] = []
    queued: set[str] = set()
    for ref, sha in items:
        missing = [v for v in range(views) if f"{sha}:{tags[v]}" not in entries]
        if missing and sha not in queued:
            queued.add(sha)
            jobs.append((ref, sha, missing))
    computed: dict[str, np.ndarray] = {}
    if jobs:
        runner = _FrozenRunner(runtime, weights, start, onnx_path)
        computed = _compute(jobs, tags, runner, store, seed, augmentation, weights, progress)
    entries.update(computed)
    if len(store.shards()) > MAX_SHARDS:
        store.compact(entries)
    maps = np.empty((len(items), views, *shape), dtype=STORE_DTYPE)
    for i, (_, sha) in enumerate(items):
        for view in range(views):
            maps[i, view] = entries[f"{sha}:{tags[view]}"]
    seconds = time.perf_counter() - started
    info = {
        "runtime": runtime,
        "parity": parity,
        "computed_views": len(computed),
        "reused_views": len({sha for _, sha in items}) * views - len(computed),
        "seconds": round(seconds, 2),
        "damaged_shards": list(store.damaged),
        "directory": str(store.directory),
    }
    return FeatureMaps(
        start=start,
        maps=maps,
        labels=np.asarray([ref.label for ref in refs], dtype=np.int64),
        keys=[ref.key for ref in refs],
        sha256=[sha for _, sha in items],
        runtime=runtime,
        key=key,
        info=info,
    )
