"""Stage `export`: the trained network as MindIR and ONNX, with its metadata inside.

ONNX comes out of `mindspore.export` and goes through `edge_build.onnx_graph` (pad order,
opset 17, dynamic batch, names, metadata). Every ONNX file must pass `onnx.checker`'s
full check and a smoke parity check against the MindSpore cell (random inputs, batch 1
and 2) before it is written: the stage never leaves a model it knows to be wrong. The
real gate, on real images, is `edge-build verify`.

Artifacts (kind -> file) are listed in `artifacts.json` in the stage directory; `verify`
finds every `<build>/*/artifacts.json`, so later stages (quantize) publish theirs the same way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic, onnx_graph, taxonomy
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.preprocessing import Preprocessing
from edge_build.provenance import provenance
from edge_build.runners import FLOAT_NCHW, UINT8_NHWC

STAGE = "export"
ARTIFACTS_FILE = "artifacts.json"
ARTIFACTS_SCHEMA = 1
#: Trace batch size. Not 1, so that a batch baked into a Reshape constant is recognizable.
TRACE_BATCH = 2
#: Smoke check at export time (random inputs, so looser than verify's real-image gate).
SMOKE_MAX_ABS = 1e-3

FILES = {
    "mindir": "network.mindir",
    "onnx_fp32": "network.onnx",
    "onnx_fp32_softmax": "network_softmax.onnx",
    "onnx_fp32_uint8": "network_uint8.onnx",
}


def artifact_metadata(
    metadata: Mapping[str, Any], preprocessing: Preprocessing, input_spec: dict[str, Any], outputs: list[str]
) -> dict[str, Any]:
    """What travels inside every artifact: labels, preprocessing, hashes, provenance, I/O contract."""
    origin = provenance()
    return {
        "edge_build.format": 1,
        "edge_build.labels": taxonomy.labels_payload(),
        "edge_build.preprocessing": preprocessing.as_dict(),
        "edge_build.input": input_spec,
        "edge_build.outputs": outputs,
        "edge_build.model": dict(metadata),
        "edge_build.version": origin["edge_build_version"],
        "edge_build.git_commit": origin["git_commit"],
    }


def _float_input_spec(size: int) -> dict[str, Any]:
    return {
        "name": onnx_graph.INPUT_NAME,
        "format": FLOAT_NCHW,
        "dtype": "float32",
        "shape": [onnx_graph.BATCH_DIM, 3, size, size],
        "preprocessing_in_graph": False,
    }


def _uint8_input_spec(size: int) -> dict[str, Any]:
    return {
        "name": onnx_graph.UINT8_INPUT_NAME,
        "format": UINT8_NHWC,
        "dtype": "uint8",
        "shape": [onnx_graph.BATCH_DIM, size, size, 3],
        "preprocessing_in_graph": True,
        "note": "raw RGB pixels resized to size x size; scaling and layout change happen inside the graph",
    }


def _fresh_wrapper(cell: Any) -> Any:
    """`cell` inside a new Cell: MindSpore 2.7 crashes ("i: 3 out of range: 3") when the same
    cell object is exported to ONNX a second time; a fresh wrapper gets a fresh graph."""
    from edge_build.msenv import mindspore_module

    ms = mindspore_module()

    class Traced(ms.nn.Cell):
        def __init__(self, inner: Any) -> None:
            super().__init__(auto_prefix=False)
            self.inner = inner

        def construct(self, x: Any) -> Any:
            return self.inner(x)

    cell.set_train(False)
    wrapper = Traced(cell)
    wrapper.set_train(False)
    return wrapper


def raw_onnx_export(cell: Any, size: int) -> Any:
    """`mindspore.export(file_format="ONNX")` as it comes (opset 11, static batch, MindSpore pads), loaded."""
    import onnx

    from edge_build.msenv import mindspore_module

    ms = mindspore_module()
    dummy = ms.Tensor(np.zeros((TRACE_BATCH, 3, size, size), dtype=np.float32))
    with tempfile.TemporaryDirectory(prefix="edge-build-export-") as tmp:
        try:
            ms.export(_fresh_wrapper(cell), dummy, file_name=str(Path(tmp) / "raw"), file_format="ONNX")
        except Exception as exc:  # MindSpore raises RuntimeError/TypeError/ValueError variants
            raise EdgeBuildError(
                f"mindspore.export to ONNX failed: {str(exc).splitlines()[0][:300]}",
                "the network uses an op MindSpore cannot export to ONNX",
            ) from exc
        return onnx.load(str(Path(tmp) / "raw.onnx"))


def _smoke_check(cell: Any, path: Path, size: int, preprocessing: Preprocessing | None, name: str) -> float:
    """Run the saved ONNX at batch 1 and 2 against the cell on fixed random inputs; the max abs error."""
    from edge_build.runners import MindSporeRunner, OnnxRunner

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    floats = (preprocessing or Preprocessing(size=size)).normalize(pixels)
    expected = MindSporeRunner(cell).run(floats)
    runner = OnnxRunner(path, threads=2)
    feed = pixels if runner.input_format == UINT8_NHWC else floats
    worst = 0.0
    for batch in (feed[:1], feed):
        got = runner.run_all(batch)
        first = next(iter(got.values()))
        worst = max(worst, float(np.max(np.abs(first - expected[: len(batch)]))))
    if not np.isfinite(worst) or worst > SMOKE_MAX_ABS:
        raise CheckFailed(
            f"{name}: exported ONNX differs from the MindSpore network by {worst:.3g} "
            f"(> {SMOKE_MAX_ABS:g}) on random inputs; not publishing it",
            "run `edge-build verify` on it for the per-layer diagnosis",
        )
    return worst


def finished_onnx(cell: Any, size: int, output_name: str = onnx_graph.LOGITS_NAME) -> Any:
    """MindSpore's ONNX export with every fix applied (`onnx_graph.finish_mindspore_export`)."""
    return onnx_graph.finish_mindspore_export(raw_onnx_export(cell, size), output_name)


def publish_onnx(
    model: Any,
    cell: Any,
    path: Path,
    size: int,
    metadata: Mapping[str, Any] | None = None,
    softmax: bool = False,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """A variant of a finished model (left untouched) written to `path` after the checks.

    `softmax` adds a `probabilities` output; `preprocessing` (when given) is embedded, making
    the input raw uint8 RGB NHWC. The file is published only when `onnx.checker` (full)
    accepts it and it agrees with `cell` on random inputs at batch 1 and 2.
    """
    import onnx

    path = Path(path)
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    if softmax:
        onnx_graph.add_softmax_output(variant, logits=variant.graph.output[0].name)
    if preprocessing is not None:
        onnx_graph.embed_preprocessing(variant, preprocessing)
    if metadata:
        onnx_graph.set_metadata(variant, metadata, doc="edge-build export of the garbage classifier")
    onnx_graph.check(variant, path.name)
    with atomic.atomic_path(path) as tmp:
        onnx.save(variant, str(tmp))
        _smoke_check(cell, tmp, size, preprocessing, path.name)
    return path


def export_onnx(
    cell: Any,
    path: Path,
    size: int,
    metadata: Mapping[str, Any] | None = None,
    output_name: str = onnx_graph.LOGITS_NAME,
    softmax: bool = False,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Export `cell` ((N,3,size,size) -> (N,K)) to an opset-17, dynamic-batch ONNX at `path` (see publish_onnx)."""
    return publish_onnx(finished_onnx(cell, size, output_name), cell, path, size, metadata, softmax, preprocessing)


def export_backbone_onnx(backbone_cell: Any, path: Path, size: int = 224) -> Path:
    """The backbone alone ((N,3,size,size) -> pooled (N,1280) `features`), dynamic batch, opset 17."""
    return export_onnx(backbone_cell, Path(path), size, output_name="features")


def export_mindir(cell: Any, path: Path, size: int, metadata: Mapping[str, Any]) -> Path:
    """`mindspore.export` MINDIR with a dynamic batch, plus `<name>.json` carrying the metadata."""
    from edge_build.msenv import mindspore_module

    ms = mindspore_module()
    spec = ms.Tensor(shape=[None, 3, size, size], dtype=ms.float32)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="edge-build-export-") as tmp:
        try:
            ms.export(_fresh_wrapper(cell), spec, file_name=str(Path(tmp) / "network"), file_format="MINDIR")
        except Exception as exc:  # MindSpore raises RuntimeError/TypeError/ValueError variants
            raise EdgeBuildError(f"mindspore.export to MINDIR failed: {str(exc).splitlines()[0][:300]}") from exc
        with atomic.atomic_path(path) as target:
            shutil.copyfile(Path(tmp) / "network.mindir", target)
    atomic.write_json(sidecar_path(path), dict(metadata))
    return path


def sidecar_path(mindir: Path) -> Path:
    return Path(mindir).with_name(Path(mindir).name + ".json")


def export_artifacts(
    network_cell: Any,
    metadata: Mapping[str, Any],
    out_dir: Path,
    softmax: bool = False,
    embed_preprocessing: bool = False,
    preprocessing: Preprocessing | None = None,
    mindir: bool = True,
) -> dict[str, Path]:
    """Write every artifact of `network_cell` into `out_dir`; kind -> path (also in `artifacts.json`).

    Kinds: `mindir`, `onnx_fp32`, plus `onnx_fp32_softmax` (`softmax`) and `onnx_fp32_uint8`
    (`embed_preprocessing`: uint8 NHWC input, with probabilities too when `softmax`).
    `metadata` (weights/data hashes, training facts) is stored with labels and preprocessing.
    """
    preprocessing = preprocessing or Preprocessing()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = preprocessing.size
    float_spec = _float_input_spec(size)
    logits = [onnx_graph.LOGITS_NAME]
    both = [onnx_graph.LOGITS_NAME, onnx_graph.PROBABILITIES_NAME]
    paths: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}

    def record(kind: str, path: Path, spec: dict[str, Any], outputs: list[str]) -> None:
        paths[kind] = path
        entries[kind] = {"file": path.name, "input_format": spec["format"], "outputs": outputs}

    if mindir:
        path = export_mindir(
            network_cell,
            out_dir / FILES["mindir"],
            size,
            artifact_metadata(metadata, preprocessing, float_spec, logits),
        )
        record("mindir", path, float_spec, logits)
    variants: list[tuple[str, dict[str, Any], list[str], bool, Preprocessing | None]] = [
        ("onnx_fp32", float_spec, logits, False, None)
    ]
    if softmax:
        variants.append(("onnx_fp32_softmax", float_spec, both, True, None))
    if embed_preprocessing:
        variants.append(
            ("onnx_fp32_uint8", _uint8_input_spec(size), both if softmax else logits, softmax, preprocessing)
        )
    base = finished_onnx(network_cell, size)
    for kind, spec, outputs, with_softmax, embedded in variants:
        path = publish_onnx(
            base,
            network_cell,
            out_dir / FILES[kind],
            size,
            artifact_metadata(metadata, preprocessing, spec, outputs),
            softmax=with_softmax,
            preprocessing=embedded,
        )
        record(kind, path, spec, outputs)
    atomic.write_json(out_dir / ARTIFACTS_FILE, {"schema": ARTIFACTS_SCHEMA, "artifacts": entries})
    return paths


def read_artifacts(directory: Path) -> dict[str, Path]:
    """kind -> path from a stage directory's `artifacts.json` ({} when it has none)."""
    listing = Path(directory) / ARTIFACTS_FILE
    try:
        payload = json.loads(listing.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"{listing}: unreadable artifact list ({exc})", "rerun the stage that wrote it") from exc
    if not isinstance(payload, dict) or payload.get("schema") != ARTIFACTS_SCHEMA:
        raise EdgeBuildError(f"{listing}: unknown artifact list format", "rerun the stage that wrote it")
    return {kind: Path(directory) / entry["file"] for kind, entry in payload["artifacts"].items()}


def find_artifacts(build_dir: Path, target: str | None = None) -> dict[str, Path]:
    """Every artifact any stage published under `build_dir` (`<build>/*/artifacts.json`).

    With `target`, per-target stage directories of other targets (`quantize-cpu` when
    asking for `lite`) are left out, so two targets' int8 models never mix.
    """
    found: dict[str, Path] = {}
    for listing in sorted(Path(build_dir).glob(f"*/{ARTIFACTS_FILE}")):
        name = listing.parent.name
        if target is not None and "-" in name and not name.endswith(f"-{target}"):
            continue
        found.update(read_artifacts(listing.parent))
    return found


def model_metadata(trained: Any) -> dict[str, Any]:
    """What the artifacts say about the model: architecture, weights' and training data's hashes, training."""
    summary = trained.summary() if hasattr(trained, "summary") else dict(trained.metadata)
    inputs = trained.metadata.get("inputs", {}) if isinstance(trained.metadata, dict) else {}
    return {
        **summary,
        "checkpoint_sha256": sha256_file(trained.checkpoint),
        "train_images": inputs.get("train_images"),
        "data_note": "train_features_sha256 identifies the training data: features keyed by each image's sha256",
    }


def stage(
    build_dir: Path,
    softmax: bool = False,
    embed_preprocessing: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Export the trained network in `build_dir` (cached on its checkpoint and the options)."""
    from edge_build.stages import run_stage
    from edge_build.trained import load_trained

    trained = load_trained(build_dir)
    preprocessing = trained.preprocessing
    metadata = model_metadata(trained)
    inputs = {
        "checkpoint_sha256": metadata["checkpoint_sha256"],
        "metadata": metadata,
        "preprocessing": preprocessing.as_dict(),
        "softmax": softmax,
        "embed_preprocessing": embed_preprocessing,
        "opset": onnx_graph.TARGET_OPSET,
        "edge_build": provenance()["edge_build_version"],
    }

    def produce(directory: Path) -> dict[str, Any]:
        for stale in directory.iterdir():
            if stale.is_file():
                stale.unlink()
        network = trained.network(fold_bn=True, softmax=False)
        paths = export_artifacts(
            network,
            metadata,
            directory,
            softmax=softmax,
            embed_preprocessing=embed_preprocessing,
            preprocessing=preprocessing,
        )
        return {kind: {"file": path.name, "bytes": path.stat().st_size} for kind, path in paths.items()}

    result = run_stage(STAGE, Path(build_dir) / STAGE, inputs, produce, force=force, log=log)
    return read_artifacts(result.directory)
