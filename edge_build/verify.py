"""Stage `verify`: every exported artifact against the MindSpore network, on real images.

Each artifact runs in its own runtime (ONNX Runtime for .onnx/.ort, `mindspore.load` +
`nn.GraphCell` for .mindir) on validation images fed the way the artifact's own metadata
says; the reference is the MindSpore network in float32. Per artifact and output:
max abs / max rel / mean / p99 abs error, cosine similarity, top-1 agreement, worst image.

When an artifact fails, the report says why, not only that it failed:
1. its metadata's preprocessing is compared with the network's;
2. known input mistakes (BGR, ImageNet mean/std, 0..1 or 0..255 pixels) are replayed on
   the reference: if one reproduces the artifact's outputs, that is the diagnosis;
3. otherwise (ONNX) the graph is localized layer by layer against the MindSpore cells
   (`localize`): the first layer whose error jumps, and any conv whose pads disagree
   with the MindSpore cell (the exporter's pad-order bug).

The result is data (`parity.json`, schema-versioned); the table, JUnit XML and Markdown
are renderings of that data. Exit 0 all pass, 1 any fails, 2 could not run.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.preprocessing import Preprocessing
from edge_build.targets import DEFAULT_PARITY, Tolerance

SCHEMA = 1
STAGE = "verify"
REPORT_NAME = "parity.json"
#: images per reference/diagnosis batch
BATCH = 32
#: BN-folded reference vs the BatchNorm form: folding may move logits by float rounding only
FOLD_MAX_ABS = 1e-4
FOLD_CHECK_IMAGES = 4
#: images replayed per input-mistake hypothesis
DIAGNOSIS_IMAGES = 8
#: relative error a layer must exceed to be blamed, by precision (quantized layers are all noisy)
LOCALIZE_FLOOR = {"fp32": 1e-4, "mindir": 1e-4, "fp16": 1e-2, "int8": 0.1}

# --- tolerances ---------------------------------------------------------------------------------


def precision_of(kind: str) -> str:
    """The parity table that judges an artifact kind: `mindir`, `int8`, `fp16` or `fp32`."""
    tokens = kind.split("_")  # by whole words: `onnx_fp32_uint8` is fp32 with a uint8 input, not int8
    if tokens[0] == "mindir":
        return "mindir"
    for precision in ("int8", "fp16"):
        if precision in tokens:
            return precision
    return "fp32"


def tolerance_for(kind: str, parity: Mapping[str, Tolerance] | None = None) -> Tolerance:
    """The tolerance for `kind`: by name in `parity` first, then by its precision, then the defaults."""
    parity = parity or {}
    if kind in parity:
        return parity[kind]
    precision = precision_of(kind)
    return parity.get(precision) or DEFAULT_PARITY[precision]


# --- comparison ---------------------------------------------------------------------------------


@dataclass
class OutputParity:
    output: str
    max_abs: float
    max_rel: float
    mean_abs: float
    p99_abs: float
    cosine_min: float
    cosine_mean: float
    top1_agreement: float
    top1_disagreements: int
    worst_image: str
    worst_image_max_abs: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def compare(output: str, got: np.ndarray, want: np.ndarray, names: Sequence[str], tolerance: Tolerance) -> OutputParity:
    """Statistics of `got` vs `want` (N, K) and the checks `tolerance` asks for.

    max_rel is elementwise |got - want| / max(|want|, 1e-6): reported, never gated on
    (logits near zero make it large without meaning anything).
    """
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got64.shape != want64.shape:
        return OutputParity(output, *(float("inf"),) * 4, 0.0, 0.0, 0.0, len(names), "", float("inf"),
                            [f"{output}: shape {list(got64.shape)}, expected {list(want64.shape)}"])  # fmt: skip
    diff = np.abs(got64 - want64)
    finite = bool(np.all(np.isfinite(got64)))
    per_image = diff.max(axis=1)
    worst = int(np.argmax(per_image)) if finite else int(np.argmax(~np.isfinite(got64).all(axis=1)))
    norms = np.linalg.norm(got64, axis=1) * np.linalg.norm(want64, axis=1)
    cosine = np.where(norms > 0, (got64 * want64).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    agree = got64.argmax(axis=1) == want64.argmax(axis=1)
    result = OutputParity(
        output=output,
        max_abs=float(diff.max()) if finite else float("inf"),
        max_rel=float((diff / np.maximum(np.abs(want64), 1e-6)).max()) if finite else float("inf"),
        mean_abs=float(diff.mean()) if finite else float("inf"),
        p99_abs=float(np.percentile(diff, 99)) if finite else float("inf"),
        cosine_min=float(cosine.min()) if finite else 0.0,
        cosine_mean=float(cosine.mean()) if finite else 0.0,
        top1_agreement=float(agree.mean()),
        top1_disagreements=int((~agree).sum()),
        worst_image=names[worst],
        worst_image_max_abs=float(per_image[worst]) if finite else float("inf"),
    )
    if not finite:
        result.failures.append(f"{output}: non-finite values (NaN/inf), first on {names[worst]}")
    if tolerance.max_abs is not None and not result.max_abs <= tolerance.max_abs:
        result.failures.append(
            f"{output}: max abs error {result.max_abs:.3g} > {tolerance.max_abs:g} (worst image {result.worst_image})"
        )
    if tolerance.min_cosine is not None and not result.cosine_min >= tolerance.min_cosine:
        result.failures.append(f"{output}: worst cosine {result.cosine_min:.6f} < {tolerance.min_cosine:g}")
    if result.top1_agreement < tolerance.top1_agreement:
        result.failures.append(
            f"{output}: top-1 agreement {result.top1_agreement:.2%} < {tolerance.top1_agreement:.2%} "
            f"({result.top1_disagreements} of {len(names)} images differ)"
        )
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


# --- feeding artifacts --------------------------------------------------------------------------

#: input mistakes a deployment makes, replayed on the reference to explain a failure
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(x.astype(np.float32), -1, -3))


INPUT_MISTAKES: dict[str, tuple[str, Callable[[np.ndarray, Preprocessing], np.ndarray]]] = {
    "bgr": (
        "the image reaches the network as BGR (red and blue channels swapped)",
        lambda px, pre: pre.normalize(np.ascontiguousarray(px[..., ::-1])),
    ),
    "imagenet_norm": (
        "the image is normalized with ImageNet mean/std ((x/255 - mean)/std) instead of the weights' "
        "x * scale + offset",
        lambda px, pre: _nchw((px.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD),
    ),
    "bgr_imagenet_norm": (
        "the image reaches the network as BGR and normalized with ImageNet mean/std (the OpenCV/Caffe habit)",
        lambda px, pre: _nchw((px[..., ::-1].astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD),
    ),
    "unit_range": (
        "the pixels are scaled to 0..1 (x/255) instead of the weights' x * scale + offset",
        lambda px, pre: _nchw(px.astype(np.float32) / 255.0),
    ),
    "raw_range": (
        "the pixels are not scaled at all (0..255)",
        lambda px, pre: _nchw(px.astype(np.float32)),
    ),
}


def declared_preprocessing(path: Path, runner: Any) -> Preprocessing | None:
    """The preprocessing an artifact's own metadata declares (what a deployment would read)."""
    raw: Any = None
    if path.suffix == ".mindir":
        from edge_build.export import sidecar_path

        sidecar = sidecar_path(path)
        if sidecar.is_file():
            try:
                raw = json.loads(sidecar.read_text(encoding="utf-8")).get("edge_build.preprocessing")
            except (OSError, ValueError):
                raw = None
    elif hasattr(runner, "session"):
        text = runner.session.get_modelmeta().custom_metadata_map.get("edge_build.preprocessing")
        try:
            raw = json.loads(text) if text else None
        except ValueError:
            raw = None
    return Preprocessing.from_dict(raw) if isinstance(raw, dict) else None


def _preprocessing_differences(declared: Preprocessing, reference: Preprocessing) -> list[str]:
    differences = []
    for name in ("size", "scale", "offset", "channel_order", "layout", "resize"):
        have, want = getattr(declared, name), getattr(reference, name)
        if have != want:
            differences.append(f"{name}={have!r} (the network's weights expect {want!r})")
    return differences


def _feed(declared: Preprocessing, pixels: np.ndarray, input_format: str) -> np.ndarray:
    """What a deployment following `declared` would pass, from RGB pixels resized to declared.size."""
    from edge_build.runners import UINT8_NHWC

    if declared.channel_order.upper() == "BGR":
        pixels = np.ascontiguousarray(pixels[..., ::-1])
    if input_format == UINT8_NHWC:
        return pixels
    return declared.normalize(pixels)


def _run_outputs(runner: Any, inputs: np.ndarray, batch: int = BATCH) -> dict[str, np.ndarray]:
    """All outputs of `runner` over `inputs`, batched."""
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), batch):
        for name, value in runner.run_all(inputs[start : start + batch]).items():
            chunks.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


# --- one artifact --------------------------------------------------------------------------------


@dataclass
class ArtifactParity:
    kind: str
    path: str
    status: str  # "pass" | "fail" | "error"
    tolerance: dict[str, Any]
    sha256: str = ""
    runtime: str = ""
    input_format: str = ""
    preprocessing: str = ""  # where the feeding recipe came from
    outputs: list[OutputParity] = field(default_factory=list)
    diagnosis: list[str] = field(default_factory=list)
    localization: dict[str, Any] | None = None
    error: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["outputs"] = [{**asdict(o), "passed": o.passed} for o in self.outputs]
        return payload


@dataclass
class Images:
    """The verification images: RGB pixels resized for the reference, names, and the paths."""

    pixels: np.ndarray  # (N, size, size, 3) uint8
    names: list[str]
    paths: list[Path]
    size: int


def load_images(paths: Sequence[Path], preprocessing: Preprocessing, names: Sequence[str] | None = None) -> Images:
    from edge_build.images import load_rgb

    if not paths:
        raise EdgeBuildError("no images to verify on", "pass at least one validation image")
    pixels = np.stack([preprocessing.resize_rgb(load_rgb(path)) for path in paths])
    labels = list(names) if names is not None else [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
    return Images(pixels, labels, [Path(p) for p in paths], preprocessing.size)


def _runtime_name(path: Path) -> str:
    return "mindspore GraphCell" if path.suffix == ".mindir" else "onnxruntime CPU"


def check_artifact(
    kind: str,
    path: Path,
    reference_cell: Any,
    reference_logits: np.ndarray,
    images: Images,
    preprocessing: Preprocessing,
    tolerance: Tolerance,
    localize_failures: bool = True,
    threads: int = 2,
    reference_runner: Any = None,
) -> ArtifactParity:
    """Run one artifact on `images` and judge it against the reference; diagnose a failure.

    `reference_runner` (a MindSporeRunner of `reference_cell`) is reused for the diagnosis.
    """
    from edge_build.runners import open_runner

    started = time.perf_counter()
    path = Path(path)
    result = ArtifactParity(kind, str(path), "error", asdict(tolerance), runtime=_runtime_name(path))
    try:
        if not path.is_file():
            raise EdgeBuildError(f"{kind}: artifact file not found: {path}", "run `edge-build export` first")
        result.sha256 = sha256_file(path)
        runner = open_runner(path, threads=threads, spinning=False)
        result.input_format = runner.input_format
        declared = declared_preprocessing(path, runner)
        if declared is None:
            declared, result.preprocessing = preprocessing, "the network's (the artifact declares none)"
        else:
            result.preprocessing = "the artifact's metadata"
        pixels = images.pixels
        if declared.size != images.size or declared.resize != preprocessing.resize:
            pixels = load_images(images.paths, declared, images.names).pixels
        outputs = _run_outputs(runner, _feed(declared, pixels, runner.input_format))
    except EdgeBuildError as exc:
        result.error = str(exc)
        result.seconds = time.perf_counter() - started
        return result
    except Exception as exc:  # a runtime failing on the batch (shape/type errors inside ORT or MindSpore)
        result.error = f"{kind}: {path.name} failed to run: {str(exc).splitlines()[0][:300]}"
        result.seconds = time.perf_counter() - started
        return result
    expected = {"logits": reference_logits, "probabilities": softmax(reference_logits)}
    names = list(outputs)
    for index, name in enumerate(names):
        want = expected.get(name, reference_logits if index == 0 else None)
        if want is None:
            continue  # an output the reference has no counterpart for
        result.outputs.append(compare(name, outputs[name], want, images.names, tolerance))
    result.status = "pass" if all(o.passed for o in result.outputs) else "fail"
    if result.status == "fail":
        first = outputs[names[0]]
        result.diagnosis, result.localization = diagnose(
            kind,
            path,
            first,
            reference_cell,
            reference_logits,
            images,
            preprocessing,
            declared,
            localize_failures,
            reference_runner,
        )
    result.seconds = time.perf_counter() - started
    return result


def diagnose(
    kind: str,
    path: Path,
    artifact_logits: np.ndarray,
    reference_cell: Any,
    reference_logits: np.ndarray,
    images: Images,
    preprocessing: Preprocessing,
    declared: Preprocessing,
    localize_failures: bool = True,
    reference_runner: Any = None,
) -> tuple[list[str], dict[str, Any] | None]:
    """Sentences naming the likely cause of a failure, and the per-layer localization if run."""
    from edge_build.runners import MindSporeRunner, run_batched

    findings = []
    differences = _preprocessing_differences(declared, preprocessing)
    if differences:
        findings.append("the artifact's metadata declares preprocessing " + ", ".join(differences))
    # Replay the input mistakes on the worst images: does one of them reproduce the artifact?
    per_image = np.abs(artifact_logits - reference_logits).max(axis=1)
    subset = np.argsort(-per_image)[:DIAGNOSIS_IMAGES]
    got = artifact_logits[subset].astype(np.float64)
    actual_error = float(np.abs(got - reference_logits[subset]).max())
    reference = reference_runner or MindSporeRunner(reference_cell)
    best: tuple[float, str] | None = None
    for _key, (sentence, mistake) in INPUT_MISTAKES.items():
        replay = run_batched(reference, mistake(images.pixels[subset], preprocessing)).astype(np.float64)
        error = float(np.abs(got - replay).max())
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(replay, axis=1)
        cosine = float(np.min((got * replay).sum(axis=1) / np.maximum(norms, 1e-30)))
        if cosine > 0.999 and error < 0.1 * actual_error and (best is None or error < best[0]):
            best = (error, sentence)
    if best is not None:
        findings.append(
            f"input: {best[1]} -- the artifact's outputs match the network fed that way "
            f"(max abs {best[0]:.2g}, against {actual_error:.2g} fed correctly, on the {len(subset)} worst images)"
        )
        return findings, None
    localization = None
    if localize_failures and path.suffix == ".onnx":
        worst = int(subset[0])
        try:
            floor = LOCALIZE_FLOOR[precision_of(kind)]
            found = localize(reference_cell, path, images.pixels[worst], preprocessing, images.names[worst], floor)
        except Exception as exc:  # a diagnosis aid must never hide the verdict it explains
            findings.append(f"per-layer localization could not run: {str(exc).splitlines()[0][:300]}")
        else:
            localization = found.as_dict()
            findings.append(found.summary())
    elif path.suffix != ".onnx":
        findings.append(
            f"no input mistake explains it; per-layer localization needs the .onnx graph ({path.suffix} is opaque): "
            "if the ONNX artifact passes, the difference is in this artifact's conversion"
        )
    if not findings:
        findings.append("no known cause found")
    return findings, localization


# --- localization ---------------------------------------------------------------------------------

#: a layer is "bad" when its relative error exceeds this floor ...
JUMP_FLOOR = 1e-4
#: ... and is this many times the worst relative error of the layers before it
JUMP_RATIO = 10.0

_ONNX_LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvInteger", "QLinearConv")


@dataclass
class LayerError:
    index: int
    mindspore_cell: str
    onnx_node: str
    onnx_op: str
    onnx_weight: str
    shape: list[int]
    max_abs: float
    rel_err: float  # max |onnx - ms| / max |ms| over the layer's output
    cosine: float


@dataclass
class PadMismatch:
    index: int
    mindspore_cell: str
    onnx_node: str
    mindspore_padding: list[int]  # (top, bottom, left, right)
    onnx_pads: list[int]  # (top, left, bottom, right)
    expected_onnx_pads: list[int]

    @property
    def mindspore_order(self) -> bool:
        """The ONNX pads are the MindSpore tuple copied verbatim: the exporter's pad-order bug."""
        return self.onnx_pads == self.mindspore_padding


@dataclass
class Localization:
    image: str
    layers: list[LayerError]
    first_bad: LayerError | None
    pad_mismatches: list[PadMismatch]
    note: str = ""

    def summary(self) -> str:
        parts = []
        if self.pad_mismatches:
            pad = self.pad_mismatches[0]
            cause = " (MindSpore's (top, bottom, left, right) order copied as is)" if pad.mindspore_order else ""
            more = len(self.pad_mismatches) - 1
            parts.append(
                f"pads: layer {pad.index} ONNX node '{pad.onnx_node}' has pads {pad.onnx_pads} but MindSpore cell "
                f"'{pad.mindspore_cell}' pads (t,b,l,r)={tuple(pad.mindspore_padding)}, i.e. ONNX "
                f"{pad.expected_onnx_pads}{cause}" + (f"; {more} more convs likewise" if more else "")
            )
        if self.first_bad is not None:
            bad = self.first_bad
            before = max((layer.rel_err for layer in self.layers[: bad.index]), default=0.0)
            where = (
                f"#{bad.index} MindSpore '{bad.mindspore_cell}' = ONNX {bad.onnx_op} '{bad.onnx_node}' "
                f"(weight '{bad.onnx_weight}')"
            )
            if np.isfinite(bad.rel_err):
                parts.append(
                    f"first layer whose error jumps: {where}: rel err {bad.rel_err:.2e} (layers before: "
                    f"<= {before:.2e}), max abs {bad.max_abs:.3g}, cosine {bad.cosine:.6f} on {self.image}"
                )
            elif bad.index == 0:  # nothing compared: the artifact's layers do not line up with the network's
                parts.append("no per-layer localization: the artifact's first layer does not match the network's")
            else:
                parts.append(f"first layer whose output differs: {where}")
        elif self.layers:
            parts.append(
                f"no layer's error jumps (worst rel err {max(layer.rel_err for layer in self.layers):.2e} over "
                f"{len(self.layers)} layers on {self.image}): the difference is outside the mapped layers"
            )
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "first_bad": asdict(self.first_bad) if self.first_bad else None,
            "pad_mismatches": [{**asdict(p), "mindspore_order": p.mindspore_order} for p in self.pad_mismatches],
            "layers": [asdict(layer) for layer in self.layers],
            "summary": self.summary(),
        }


@dataclass
class _MsLayer:
    name: str
    cell: Any
    output: np.ndarray


def _mindspore_layers(reference_cell: Any, batch: np.ndarray) -> list[_MsLayer]:
    from edge_build.msenv import mindspore_module

    ms = mindspore_module()
    nn = ms.nn
    names = {id(cell): name for name, cell in reference_cell.cells_and_names()}
    kinds = (nn.Conv2d, nn.Dense, nn.BatchNorm2d)
    executed: list[tuple[Any, np.ndarray]] = []

    def hook(cell: Any, _inputs: Any, output: Any) -> None:
        executed.append((cell, output.asnumpy().astype(np.float32)))

    handles = [
        cell.register_forward_hook(hook) for _, cell in reference_cell.cells_and_names() if isinstance(cell, kinds)
    ]
    try:
        reference_cell.set_train(False)
        # op by op (PyNative), never a compiled graph: hooks are not called inside one
        nn.Cell.__call__(reference_cell, ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32)))
    finally:
        for handle in handles:
            handle.remove()
    layers: list[_MsLayer] = []
    for cell, output in executed:
        if isinstance(cell, nn.BatchNorm2d):
            if layers and isinstance(layers[-1].cell, nn.Conv2d):
                layers[-1].output = output  # BatchNorm belongs to the conv before it
            continue
        layers.append(_MsLayer(names.get(id(cell), type(cell).__name__), cell, output))
    return layers


def _onnx_layers(model: Any) -> list[tuple[Any, str]]:
    """(layer node, tensor holding the layer's output) in graph order."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in _ONNX_LAYER_OPS:
            continue
        output = node.output[0]
        following = consumers.get(output, [])
        if len(following) == 1:
            nxt = following[0]
            if nxt.op_type == "BatchNormalization" or (
                node.op_type == "MatMul" and nxt.op_type == "Add" and any(i in initializers for i in nxt.input)
            ):
                output = nxt.output[0]
        layers.append((node, output))
    return layers


def _weight_name(node: Any, model: Any) -> str:
    if len(node.input) < 2:
        return ""
    name = node.input[1]
    producers = {out: n for n in model.graph.node for out in n.output}
    # QDQ graphs: Conv <- DequantizeLinear <- int8 initializer
    if name in producers and producers[name].op_type == "DequantizeLinear":
        return producers[name].input[0]
    return name


def _expected_pads(cell: Any) -> list[int] | None:
    if getattr(cell, "pad_mode", "").lower() != "pad":
        return None
    padding = cell.padding
    top, bottom, left, right = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    return [int(top), int(bottom), int(left), int(right)]


def pad_mismatches(ms_layers: list[_MsLayer], onnx_layers: list[tuple[Any, str]]) -> list[PadMismatch]:
    """Convs whose ONNX `pads` are not the MindSpore cell's padding in ONNX order (top, left, bottom, right)."""
    found = []
    for index, (ms_layer, (node, _)) in enumerate(zip(ms_layers, onnx_layers, strict=False)):
        expected = _expected_pads(ms_layer.cell) if node.op_type == "Conv" else None
        actual = next((list(a.ints) for a in node.attribute if a.name == "pads"), None)
        if expected is None or actual is None:
            continue
        top, bottom, left, right = expected
        if actual != [top, left, bottom, right]:
            found.append(PadMismatch(index, ms_layer.name, node.name, expected, actual, [top, left, bottom, right]))
    return found


def _errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    got64, want64 = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(got64 - want64)))
    scale = float(np.max(np.abs(want64))) or 1.0
    norms = float(np.linalg.norm(got64) * np.linalg.norm(want64))
    cosine = float(got64 @ want64 / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    return max_abs, max_abs / scale, cosine


def localize(
    reference_cell: Any,
    onnx_path: Path,
    image: np.ndarray | str | Path,
    preprocessing: Preprocessing,
    image_name: str | None = None,
    floor: float = JUMP_FLOOR,
) -> Localization:
    """Run one image through both and report the first layer whose error jumps.

    `image` is a path or an HxWx3 uint8 RGB array; the ONNX model gets it the way its
    input asks (float NCHW through `preprocessing`, or raw uint8 NHWC pixels). `floor` is
    the relative error a layer must exceed to be blamed (raise it for fp16/int8 graphs,
    whose every layer carries rounding noise).
    """
    import onnx
    import onnxruntime as ort

    from edge_build.images import as_rgb_array
    from edge_build.onnx_graph import expose_outputs

    onnx_path = Path(onnx_path)
    if onnx_path.suffix != ".onnx":
        raise EdgeBuildError(f"{onnx_path.name}: per-layer localization needs an .onnx file")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # DecodeError and friends
        raise EdgeBuildError(
            f"{onnx_path}: cannot read it as ONNX ({exc})", "rebuild it with `edge-build export`"
        ) from exc
    pixels = preprocessing.resize_rgb(as_rgb_array(image))[None]
    floats = preprocessing.normalize(pixels)
    ms_layers = _mindspore_layers(reference_cell, floats)
    if not ms_layers:
        raise EdgeBuildError("the MindSpore network has no Conv2d/Dense cells to compare layer by layer")
    onnx_layers = _onnx_layers(model)
    note = ""
    if len(ms_layers) != len(onnx_layers):
        note = (
            f"the graphs have different layer counts (MindSpore {len(ms_layers)}, ONNX {len(onnx_layers)}): "
            "compared by position up to the first shape mismatch"
        )
    expose_outputs(model, [tensor for _, tensor in onnx_layers])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed_input = session.get_inputs()[0]
    feed = pixels if feed_input.type == "tensor(uint8)" else floats
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {feed_input.name: feed}), strict=True))

    layers: list[LayerError] = []
    pads = pad_mismatches(ms_layers, onnx_layers)
    for index, (ms_layer, (node, tensor)) in enumerate(zip(ms_layers, onnx_layers, strict=False)):
        got = np.asarray(values[tensor], dtype=np.float32)
        want = ms_layer.output
        if got.shape != want.shape:
            note = (
                f"layer {index}: shapes differ (MindSpore '{ms_layer.name}' {list(want.shape)}, ONNX '{node.name}' "
                f"{list(got.shape)}); stopped comparing there"
            )
            layers.append(LayerError(index, ms_layer.name, node.name, node.op_type, _weight_name(node, model),
                                     list(want.shape), float("inf"), float("inf"), 0.0))  # fmt: skip
            break
        max_abs, rel_err, cosine = _errors(got, want)
        layers.append(
            LayerError(
                index,
                ms_layer.name,
                node.name,
                node.op_type,
                _weight_name(node, model),
                list(want.shape),
                max_abs,
                rel_err,
                cosine,
            )
        )
    return Localization(
        image=image_name or (str(image) if isinstance(image, (str, Path)) else "image"),
        layers=layers,
        first_bad=first_jump(layers, floor),
        pad_mismatches=pads,
        note=note,
    )


def first_jump(layers: list[LayerError], floor: float = JUMP_FLOOR) -> LayerError | None:
    """The first layer whose relative error is over `floor` and a jump over every layer before it."""
    worst_before = 0.0
    for layer in layers:
        if layer.rel_err > floor and layer.rel_err > JUMP_RATIO * max(worst_before, 1e-7):
            return layer
        worst_before = max(worst_before, layer.rel_err)
    return None


# --- all artifacts: the report --------------------------------------------------------------------


@dataclass
class ParityReport:
    artifacts: list[ArtifactParity]
    reference: dict[str, Any]
    images: dict[str, Any]
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def exit_code(self) -> int:
        return exit_code(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        statuses = [a.status for a in self.artifacts]
        return {
            "schema": SCHEMA,
            "created": self.created,
            "verdict": "error" if "error" in statuses or not statuses else "fail" if "fail" in statuses else "pass",
            "reference": self.reference,
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "artifacts": [a.as_dict() for a in self.artifacts],
        }


def exit_code(payload: Mapping[str, Any]) -> int:
    """0 every artifact passed, 1 one failed, 2 one could not be checked (or there were none)."""
    return {"pass": 0, "fail": 1}.get(payload["verdict"], 2)


def verify_artifacts(
    reference_cell: Any,
    artifacts: Mapping[str, Path],
    images: Sequence[Path],
    preprocessing: Preprocessing,
    tolerances: Mapping[str, Tolerance] | None = None,
    names: Sequence[str] | None = None,
    reference_info: Mapping[str, Any] | None = None,
    localize_failures: bool = True,
    threads: int = 2,
    batchnorm_cell: Any = None,
    log: Callable[[str], None] | None = None,
) -> ParityReport:
    """Check every artifact (kind -> path) against `reference_cell` on `images`.

    `tolerances` maps an artifact kind or a precision (`fp32`, `mindir`, `int8`, `fp16`) to
    its Tolerance (defaults: `edge_build.targets.DEFAULT_PARITY`). When the reference is the
    BatchNorm-folded network (twice as fast in MindSpore), pass the BatchNorm form as
    `batchnorm_cell`: the two are checked equal on the first images first. Raises
    EdgeBuildError when the images or the reference cannot be run (or the folded reference
    is not the network); an artifact that cannot be loaded is reported with status
    "error" (exit 2), the others are still checked.
    """
    from edge_build.runners import MindSporeRunner, run_batched

    say = log or (lambda _message: None)
    started = time.perf_counter()
    loaded = load_images(images, preprocessing, names)
    say(f"verify: {len(loaded.names)} images, MindSpore reference forward")
    reference_runner = MindSporeRunner(reference_cell)
    try:
        reference_logits = run_batched(reference_runner, preprocessing.normalize(loaded.pixels), BATCH)
    except Exception as exc:  # MindSpore raises RuntimeError/ValueError/TypeError variants
        raise EdgeBuildError(
            f"the MindSpore reference network failed to run: {str(exc).splitlines()[0][:300]}",
            "check the trained network with `edge-build eval`",
        ) from exc
    info = {"runtime": "mindspore float32 on CPU", **dict(reference_info or {})}
    if batchnorm_cell is not None:
        info["fold_check"] = check_fold(reference_cell, batchnorm_cell, loaded, preprocessing, reference_logits)
    results = []
    for kind, path in artifacts.items():
        say(f"verify: {kind} ({Path(path).name})")
        results.append(
            check_artifact(
                kind,
                Path(path),
                reference_cell,
                reference_logits,
                loaded,
                preprocessing,
                tolerance_for(kind, tolerances),
                localize_failures,
                threads,
                reference_runner,
            )
        )
    return ParityReport(
        artifacts=results,
        reference=info,
        images={
            "count": len(loaded.names),
            "size": preprocessing.size,
            "preprocessing": preprocessing.as_dict(),
            "names_sha256": _names_digest(loaded.names),
        },
        seconds=time.perf_counter() - started,
    )


def check_fold(
    folded_cell: Any, batchnorm_cell: Any, images: Images, preprocessing: Preprocessing, folded_logits: np.ndarray
) -> dict[str, Any]:
    """The folded reference against the BatchNorm form on the first FOLD_CHECK_IMAGES images."""
    from edge_build.runners import MindSporeRunner

    count = min(FOLD_CHECK_IMAGES, len(images.names))
    want = MindSporeRunner(batchnorm_cell).run(preprocessing.normalize(images.pixels[:count]))
    error = float(np.max(np.abs(folded_logits[:count] - want)))
    if not error <= FOLD_MAX_ABS:
        raise EdgeBuildError(
            f"the BatchNorm-folded reference differs from the trained network by {error:.3g} (> {FOLD_MAX_ABS:g}) "
            f"on {count} images: it cannot serve as the reference",
            "this is a bug in fold_batchnorm; verify with the BatchNorm form as the reference",
        )
    return {"images": count, "max_abs": error, "limit": FOLD_MAX_ABS}


def _names_digest(names: Sequence[str]) -> str:
    from edge_build.hashing import sha256_bytes

    return sha256_bytes("\n".join(names).encode("utf-8"))


# --- renderings -------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not np.isfinite(value):
        return "inf"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def _rows(payload: Mapping[str, Any]) -> list[list[str]]:
    count = payload["images"]["count"]
    rows = []
    for artifact in payload["artifacts"]:
        if artifact["status"] == "error":
            rows.append([artifact["kind"], "-", *["-"] * 6, "-", "ERROR"])
            continue
        for out in artifact["outputs"]:
            agree = round(out["top1_agreement"] * count)
            rows.append(
                [
                    artifact["kind"],
                    out["output"],
                    _number(out["max_abs"]),
                    _number(out["max_rel"]),
                    _number(out["mean_abs"]),
                    _number(out["p99_abs"]),
                    f"{out['cosine_min']:.6f}",
                    f"{agree}/{count}",
                    out["worst_image"],
                    "PASS" if out["passed"] else "FAIL",
                ]
            )
    return rows


_HEADER = ["artifact", "output", "max abs", "max rel", "mean abs", "p99 abs", "cos min", "top-1", "worst image", ""]


def _findings(payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    lines = []
    for artifact in payload["artifacts"]:
        if artifact["status"] == "error":
            lines.append((artifact["kind"], f"could not run: {artifact['error']}"))
        for out in artifact["outputs"]:
            lines.extend((artifact["kind"], failure) for failure in out["failures"])
        lines.extend((artifact["kind"], f"diagnosis: {finding}") for finding in artifact["diagnosis"])
    return lines


def render_table(payload: Mapping[str, Any]) -> str:
    """The terminal table plus one line per failure and diagnosis."""
    rows = [_HEADER, *_rows(payload)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.extend(f"{kind}: {text}" for kind, text in _findings(payload))
    verdict = payload["verdict"].upper()
    lines.append(
        f"{verdict}: {len(payload['artifacts'])} artifacts on {payload['images']['count']} images "
        f"in {payload['seconds']:.1f} s (reference: {payload['reference'].get('runtime', '?')})"
    )
    return "\n".join(lines)


def markdown(payload: Mapping[str, Any]) -> str:
    """The parity table as GitHub-flavoured Markdown (for a CI job summary)."""
    icon = {"pass": "✅", "fail": "❌", "error": "⚠️"}[payload["verdict"]]
    lines = [
        f"### {icon} edge-build verify: {payload['verdict']} ({payload['images']['count']} images)",
        "",
        "| " + " | ".join([*_HEADER[:-1], "verdict"]) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(payload)]
    findings = _findings(payload)
    if findings:
        lines += ["", *[f"- **{kind}**: {text}" for kind, text in findings]]
    return "\n".join(lines) + "\n"


def junit_xml(payload: Mapping[str, Any]) -> str:
    """JUnit XML: one test case per artifact x check (what CI servers display)."""
    suite = ET.Element("testsuite", name="edge-build verify", time=f"{payload['seconds']:.3f}")
    counts = {"tests": 0, "failures": 0, "errors": 0}
    for artifact in payload["artifacts"]:
        kind = artifact["kind"]
        if artifact["status"] == "error":
            case = ET.SubElement(suite, "testcase", classname=f"parity.{kind}", name="runs")
            ET.SubElement(case, "error", message=artifact["error"][:500]).text = artifact["error"]
            counts["tests"] += 1
            counts["errors"] += 1
            continue
        tolerance = artifact["tolerance"]
        diagnosis = "\n".join(artifact["diagnosis"])
        for out in artifact["outputs"]:
            checks = [("top1_agreement", f"top-1 agreement {out['top1_agreement']:.2%}", "top-1 agreement")]
            if tolerance.get("max_abs") is not None:
                checks.append(("max_abs", f"max abs {_number(out['max_abs'])}", "max abs error"))
            if tolerance.get("min_cosine") is not None:
                checks.append(("min_cosine", f"worst cosine {out['cosine_min']:.6f}", "cosine"))
            checks.append(("finite", "all finite", "non-finite"))
            for check, text, marker in checks:
                case = ET.SubElement(suite, "testcase", classname=f"parity.{kind}", name=f"{out['output']}.{check}")
                ET.SubElement(case, "system-out").text = f"{text}; worst image {out['worst_image']}"
                failed = [f for f in out["failures"] if marker in f]
                counts["tests"] += 1
                if failed:
                    counts["failures"] += 1
                    failure = ET.SubElement(case, "failure", message=failed[0][:500])
                    failure.text = "\n".join(failed) + ("\n" + diagnosis if diagnosis else "")
    for key, value in counts.items():
        suite.set(key, str(value))
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


# --- the stage ----------------------------------------------------------------------------------------


def select_images(refs: Sequence[Any], count: int | None) -> list[Any]:
    """`count` images spread evenly over `refs` (sorted by class), or all of them."""
    if count is None or count >= len(refs):
        return list(refs)
    if count < 1:
        raise EdgeBuildError(f"--images {count}: need at least one image")
    indices = np.unique(np.linspace(0, len(refs) - 1, count).round().astype(int))
    return [refs[i] for i in indices]


def stage(
    build_dir: Path,
    data_root: Path,
    artifacts: Mapping[str, Path] | None = None,
    parity: Mapping[str, Tolerance] | None = None,
    images: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    directory: Path | None = None,
) -> dict[str, Any]:
    """Verify `artifacts` (default: every artifact published under `build_dir`) on the validation
    split of `data_root`; writes and returns `<build>/verify/parity.json` (cached on the artifacts',
    network's and images' hashes and the tolerances)."""
    from edge_build.dataset import list_split
    from edge_build.export import find_artifacts
    from edge_build.stages import RECORD_NAME, run_stage
    from edge_build.trained import load_trained

    build_dir = Path(build_dir)
    artifacts = dict(artifacts) if artifacts is not None else find_artifacts(build_dir)
    if not artifacts:
        raise EdgeBuildError(f"no exported artifacts in {build_dir}", "run `edge-build export` first")
    trained = load_trained(build_dir)
    refs = select_images(list_split(Path(data_root), "val"), images)
    tolerances = {kind: tolerance_for(kind, parity) for kind in artifacts}
    inputs = {
        "schema": SCHEMA,
        "artifacts": {kind: sha256_file(p) if Path(p).is_file() else f"missing:{p}" for kind, p in artifacts.items()},
        "network": sha256_file(trained.checkpoint),
        "images": [[ref.key, sha256_file(ref.path)] for ref in refs],
        "preprocessing": trained.preprocessing.as_dict(),
        "tolerances": {kind: asdict(t) for kind, t in tolerances.items()},
    }

    def produce(directory: Path) -> dict[str, Any]:
        from edge_build.msenv import mindspore_module

        report = verify_artifacts(
            trained.network(fold_bn=True, softmax=False),
            artifacts,
            [ref.path for ref in refs],
            trained.preprocessing,
            tolerances,
            names=[ref.key for ref in refs],
            reference_info={
                "runtime": f"mindspore {mindspore_module().__version__} float32 on CPU, BatchNorm folded",
                "checkpoint": str(trained.checkpoint),
                "checkpoint_sha256": inputs["network"],
            },
            batchnorm_cell=trained.network(fold_bn=False, softmax=False),
            log=log,
        )
        payload = report.as_dict()
        atomic.write_json(directory / REPORT_NAME, payload)
        return {"verdict": payload["verdict"]}

    result = run_stage(STAGE, directory or build_dir / STAGE, inputs, produce, force=force, log=log)
    payload = json.loads((result.directory / REPORT_NAME).read_text(encoding="utf-8"))
    if payload["verdict"] == "error":
        (result.directory / RECORD_NAME).unlink(missing_ok=True)  # never cache "could not run"
    return payload
