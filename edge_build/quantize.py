"""Stage `quantize`: fp32 ONNX -> int8 ONNX (and ORT format), gated on validation accuracy.

ONNX Runtime static quantization, QDQ format, after `quant_pre_process`; activation
ranges calibrated on the committed calibration set through the one shared
preprocessing; with `bias_correction` (the default) the mean output shift of the int8
weight rounding is folded into the biases and the model quantized again. The int8
model is checked (onnx.checker, loads and runs in ONNX Runtime) and then judged: fp32
and int8 top-1 on the validation split side by side, and the stage fails when the
drop exceeds the target profile's maximum, naming the most sensitive nodes so they
can be excluded (`--exclude-nodes`) on the next try.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic, quant_graph
from edge_build.calibration import CalibrationSet
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.images import load_rgb
from edge_build.preprocessing import Preprocessing
from edge_build.runners import FLOAT_NCHW, UINT8_NHWC, OnnxRunner, run_batched
from edge_build.stages import run_stage
from edge_build.targets import TargetProfile

INT8_ONNX = "model_int8.onnx"
INT8_ORT = "model_int8.ort"
REPORT = "quantize.json"
#: bumped whenever the recipe (graph rewrites, quantizer options) changes: cached models are rebuilt
SCHEMA = 2
CALIBRATION_BATCH = 10
#: ops never quantized: a uint8 softmax would round probabilities to 1/255 steps
_NEVER_QUANTIZE = frozenset({"Softmax"})


@dataclass
class QuantizeResult:
    int8_onnx: Path
    int8_ort: Path | None
    fp32_top1: float
    int8_top1: float
    drop_pt: float
    max_drop_pt: float
    agreement: float
    val_images: int
    fp32_bytes: int
    int8_bytes: int
    settings: dict[str, Any]
    ran: bool = True
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)  # calibration methods tried before this one

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def passed(self) -> bool:
        return self.drop_pt <= self.max_drop_pt + 1e-9

    def as_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["size_ratio"] = round(self.size_ratio, 4)
        payload["passed"] = self.passed
        return payload

    def summary(self) -> str:
        return (
            f"int8 top-1 {self.int8_top1:.2f} % vs fp32 {self.fp32_top1:.2f} % on {self.val_images} validation images "
            f"(drop {self.drop_pt:+.2f} pt, max {self.max_drop_pt:g}); agreement {self.agreement:.3f}; "
            f"size {self.int8_bytes / 1e6:.2f} MB = {self.size_ratio:.0%} of fp32; "
            f"{self.settings.get('method')} calibration"
            + (f" (after {', '.join(a['method'] for a in self.attempts)} failed the gate)" if self.attempts else "")
        )


class AccuracyGateFailed(CheckFailed):
    """The int8 model lost more top-1 than the profile allows; `result.sensitivity` names suspects."""

    def __init__(self, result: QuantizeResult, report: Path) -> None:
        self.result = result
        suspects = ", ".join(s["node"] for s in result.sensitivity[:5]) or "none found"
        fix = "retry with `edge-build quantize --exclude-nodes NODE[,NODE...]` or another --method"
        if _saturation_possible(result.settings):
            fix = (
                "this CPU has no VNNI, so ONNX Runtime's U8S8 kernels add u8*s8 pairs in saturating int16 "
                "(VPMADDUBSW) and 8-bit weights overflow them: set `reduce_range = true` under [quantization] "
                f"in the target profile (7-bit weights); or {fix}"
            )
        super().__init__(
            f"int8 accuracy gate failed: {result.summary()}; most sensitive nodes: {suspects} (details in {report})",
            fix,
        )


#: x86 CPU flags with a non-saturating u8*s8 dot product (ONNX Runtime uses it when present)
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def u8s8_may_saturate(cpuinfo: str | None = None) -> bool:
    """Whether this machine's U8S8 int8 kernels can saturate: x86 without VNNI (AVX2 / AVX-512F only)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return "avx2" in flags and not flags & _VNNI_FLAGS
    return False


def _saturation_possible(settings: dict[str, Any]) -> bool:
    eight_bit_u8s8 = settings.get("activation_type") == "uint8" and settings.get("weight_type") == "int8"
    return eight_bit_u8s8 and not settings.get("reduce_range") and u8s8_may_saturate()


def quantization_settings(profile: TargetProfile, exclude_nodes: Sequence[str] = ()) -> dict[str, Any]:
    q = profile.quantization
    settings = {
        "format": "qdq",
        "method": q.method,
        "per_channel": q.per_channel,
        "activation_type": q.activation_type,
        "weight_type": q.weight_type,
        "reduce_range": q.reduce_range,
        "input_format": q.input_format,
        "bias_correction": q.bias_correction,
        "exclude_nodes": sorted(set(exclude_nodes)),
        "calibration_batch": CALIBRATION_BATCH,
        "fallback_methods": [m for m in q.fallback_methods if m != q.method],
    }
    return _with_method(settings, q.method, profile)


def _with_method(settings: dict[str, Any], method: str, profile: TargetProfile) -> dict[str, Any]:
    percentile = profile.quantization.percentile if method == "percentile" else None
    return {**settings, "method": method, "percentile": percentile}


# --- calibration data ------------------------------------------------------------------------------


def _calibration_reader(input_name: str, calibration: CalibrationSet, preprocessing: Preprocessing) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    paths = calibration.paths

    class Reader(CalibrationDataReader):
        """Batches of preprocessed calibration images; `set_range` for strided collection."""

        def __init__(self) -> None:
            self.starts = list(range(0, len(paths), CALIBRATION_BATCH))
            self.set_range(0, len(self.starts))

        def __len__(self) -> int:
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.starts[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.pending, None)
            if start is None:
                return None
            return {input_name: preprocessing.prepare_batch(paths[start : start + CALIBRATION_BATCH])}

    return Reader()


# --- quantization ----------------------------------------------------------------------------------


def _quant_types(settings: dict[str, Any]) -> tuple[Any, Any]:
    from onnxruntime.quantization import QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    return types[settings["activation_type"]], types[settings["weight_type"]]


def _calibration_method(settings: dict[str, Any]) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[settings["method"]]


def prepare_float_model(fp32_onnx: Path, out_path: Path, global_pool: bool = True) -> Any:
    """quant_pre_process (shape inference + graph optimization), every node named, H,W means as
    GlobalAveragePool; returns the model (written to `out_path`)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(fp32_onnx))
    quant_graph.require_opset(model, fp32_onnx)
    quant_graph.name_nodes(model)
    with tempfile.TemporaryDirectory() as scratch:
        named = Path(scratch) / "named.onnx"
        onnx.save(model, str(named))
        try:
            quant_pre_process(str(named), str(out_path), skip_symbolic_shape=False)
        except Exception as exc:  # shape inference raises assorted exception types
            raise EdgeBuildError(
                f"{fp32_onnx}: ONNX Runtime's quantization pre-processing failed ({str(exc).splitlines()[0][:200]})",
                "the fp32 model must load and run in ONNX Runtime; rebuild it with `edge-build export`",
            ) from exc
    prepared = onnx.load(str(out_path))
    quant_graph.name_nodes(prepared)
    if global_pool:
        quant_graph.pool_to_global_average(prepared)
    onnx.save(prepared, str(out_path))
    return prepared


def _check_excluded_nodes(model: Any, exclude_nodes: Sequence[str], source: Path) -> None:
    names = [node.name for node in model.graph.node]
    unknown = [name for name in exclude_nodes if name not in names]
    if unknown:
        convs = [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
        raise EdgeBuildError(
            f"--exclude-nodes: no node named '{unknown[0]}' in {source}",
            f"node names come from the sensitivity report; e.g. {', '.join(convs[:4])} ...",
        )


def quantize_prepared(
    prepared: Path,
    out_path: Path,
    calibration: CalibrationSet,
    preprocessing: Preprocessing,
    settings: dict[str, Any],
) -> None:
    """ORT static quantization (QDQ) of a pre-processed float model; writes `out_path` (not atomic)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.registry import QLinearOpsRegistry

    model = onnx.load(str(prepared))
    input_name = quant_graph.graph_inputs(model)[0].name
    output_ops = sorted({n.op_type for n in model.graph.node if set(n.output) & {o.name for o in model.graph.output}})
    activation_type, weight_type = _quant_types(settings)
    extra: dict[str, Any] = {
        # Keep the graph outputs (logits) in float: uint8 logits could tie the top-1.
        "OpTypesToExcludeOutputQuantization": output_ops,
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
    }
    # Every activation of every calibration image at once would not fit in memory: reduce per batch
    # (ranges or histograms merged). Not CalibMaxIntermediateOutputs: ORT 1.32 drops those batches.
    extra["CalibStridedMinMax"] = 1
    if settings["method"] == "percentile":
        extra["CalibPercentile"] = settings["percentile"]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs pre-processing advice and progress on the root logger
    try:
        # The histogram calibrators print progress to stdout; it would pollute the command's output.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(out_path),
                _calibration_reader(input_name, calibration, preprocessing),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=sorted(set(QLinearOpsRegistry) - _NEVER_QUANTIZE),
                per_channel=settings["per_channel"],
                reduce_range=settings["reduce_range"],
                activation_type=activation_type,
                weight_type=weight_type,
                nodes_to_exclude=list(settings["exclude_nodes"]) or None,
                calibrate_method=_calibration_method(settings),
                extra_options=extra,
            )
    finally:
        root.setLevel(level)


def _correct_biases(
    prepared: Path, quantized: Path, calibration: CalibrationSet, preprocessing: Preprocessing, scratch: Path
) -> dict[str, Any]:
    """scratch/corrected.onnx: `prepared` with the int8 weight-rounding shift of `quantized` taken out of its biases."""
    import onnx

    from edge_build.bias_correction import BATCH, correct_biases, input_channel_means

    float_model = onnx.load(str(prepared))
    means = input_channel_means(float_model, calibration.batches(preprocessing, BATCH))
    summary = correct_biases(float_model, onnx.load(str(quantized)), means)
    onnx.save(float_model, str(scratch / "corrected.onnx"))
    return {**summary, "calibration_images": len(calibration)}


# --- accuracy --------------------------------------------------------------------------------------


def model_inputs(runner: OnnxRunner, images: Sequence[Path], preprocessing: Preprocessing) -> np.ndarray:
    """The batch a runner takes: preprocessed float NCHW, or resized uint8 NHWC pixels."""
    if runner.input_format == UINT8_NHWC:
        return np.stack([preprocessing.resize_rgb(load_rgb(path)) for path in images])
    return preprocessing.prepare_batch(list(images))


def top1(logits: np.ndarray, labels: Sequence[int]) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)) * 100.0)


# --- the stage -------------------------------------------------------------------------------------


def _stage_inputs(
    fp32_onnx: Path,
    calibration: CalibrationSet,
    preprocessing: Preprocessing,
    profile: TargetProfile,
    val_images: Sequence[Path],
    val_labels: Sequence[int],
    settings: dict[str, Any],
) -> dict[str, Any]:
    import onnxruntime

    return {
        "schema": SCHEMA,
        "onnxruntime": onnxruntime.__version__,
        "fp32_onnx": sha256_file(fp32_onnx),
        "calibration": calibration.fingerprint,
        "preprocessing": preprocessing.as_dict(),
        "settings": settings,
        "max_drop_pt": profile.budget.max_accuracy_drop_pt,
        "ort": "ort_int8" in profile.artifacts,
        "threads": profile.runtime.threads,
        "validation": [
            [str(Path(p).name), sha256_file(Path(p)), int(label)]
            for p, label in zip(val_images, val_labels, strict=True)
        ],
    }


def quantize_model(
    fp32_onnx: Path,
    calibration: CalibrationSet,
    preprocessing: Preprocessing,
    out_dir: Path,
    profile: TargetProfile,
    val_images: Sequence[Path],
    val_labels: Sequence[int],
    exclude_nodes: Sequence[str] = (),
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize `fp32_onnx` for `profile` into `out_dir` (cached); raise AccuracyGateFailed over budget."""
    fp32_onnx, out_dir = Path(fp32_onnx), Path(out_dir)
    if not fp32_onnx.is_file():
        raise EdgeBuildError(f"fp32 ONNX model not found: {fp32_onnx}", "run `edge-build export` first")
    if len(val_images) != len(val_labels) or not val_images:
        raise EdgeBuildError("quantize needs validation images and one label per image")
    settings = quantization_settings(profile, exclude_nodes)
    inputs = _stage_inputs(fp32_onnx, calibration, preprocessing, profile, val_images, val_labels, settings)

    def produce(directory: Path) -> dict[str, Any]:
        for stale in directory.iterdir():  # a previous run's files (another profile's .ort, a failed report)
            if stale.is_file():
                stale.unlink()
        methods = [settings["method"], *settings["fallback_methods"]]
        attempts: list[dict[str, Any]] = []
        for number, method in enumerate(methods, 1):
            try:
                result = _quantize_and_judge(
                    fp32_onnx,
                    calibration,
                    preprocessing,
                    directory,
                    profile,
                    val_images,
                    val_labels,
                    _with_method(settings, method, profile),
                    log,
                )
                break
            except AccuracyGateFailed as failed:
                attempts.append({"method": method, "passed": False, "summary": failed.result.summary()})
                if number == len(methods):
                    if len(methods) > 1:
                        earlier = "; ".join(f"{a['method']}: {a['summary']}" for a in attempts[:-1])
                        failed.message += f"; calibration methods tried before {method}: {earlier}"
                    raise
                if log:
                    log(f"quantize: {method} calibration failed the gate; trying {methods[number]}")
        if attempts:
            result.attempts = attempts
            atomic.write_json(directory / REPORT, {"schema": SCHEMA, **_portable(result)})
        return _portable(result)

    stage = run_stage("quantize", out_dir, inputs, produce, force=force, log=log)
    return result_from_record(stage.info, out_dir, ran=stage.ran)


def _portable(result: QuantizeResult) -> dict[str, Any]:
    """as_dict with the model files named relative to the stage directory (records and reports)."""
    ort_name = result.int8_ort.name if result.int8_ort else None
    return {**result.as_dict(), "int8_onnx": result.int8_onnx.name, "int8_ort": ort_name}


def result_from_record(info: dict[str, Any], directory: Path, ran: bool) -> QuantizeResult:
    """A QuantizeResult from a stage record (file names relative to the stage directory)."""
    fields = {k: v for k, v in info.items() if k in QuantizeResult.__dataclass_fields__}
    fields["int8_onnx"] = directory / info["int8_onnx"]
    fields["int8_ort"] = directory / info["int8_ort"] if info.get("int8_ort") else None
    fields["ran"] = ran
    return QuantizeResult(**fields)


def _quantize_and_judge(
    fp32_onnx: Path,
    calibration: CalibrationSet,
    preprocessing: Preprocessing,
    directory: Path,
    profile: TargetProfile,
    val_images: Sequence[Path],
    val_labels: Sequence[int],
    settings: dict[str, Any],
    log: Callable[[str], None] | None,
) -> QuantizeResult:
    import onnx

    from edge_build.onnx_graph import read_metadata, set_metadata

    say = log or (lambda _message: None)
    int8_path = directory / INT8_ONNX
    with tempfile.TemporaryDirectory(prefix="edge-build-quantize-") as scratch_dir:
        scratch = Path(scratch_dir)
        prepared_path = scratch / "prepared.onnx"
        say(f"quantize: pre-processing {fp32_onnx.name} (shape inference, graph optimization)")
        prepared = prepare_float_model(fp32_onnx, prepared_path)
        _check_excluded_nodes(prepared, settings["exclude_nodes"], fp32_onnx)
        qdq_path = scratch / "qdq.onnx"
        say(f"quantize: calibrating on {len(calibration)} images ({settings['method']}), writing QDQ int8")
        quantize_prepared(prepared_path, qdq_path, calibration, preprocessing, settings)
        correction = None
        if settings.get("bias_correction"):
            say("quantize: bias correction (mean shift of the int8 weight rounding), re-quantizing")
            correction = _correct_biases(prepared_path, qdq_path, calibration, preprocessing, scratch)
            quantize_prepared(scratch / "corrected.onnx", qdq_path, calibration, preprocessing, settings)
        model = onnx.load(str(qdq_path))
        fold = None
        if settings["input_format"] == "uint8_nhwc":
            fold = quant_graph.fold_uint8_input(model, preprocessing)
            fold["stem"] = quant_graph.group_stem_columns(model)
        metadata = read_metadata(onnx.load(str(fp32_onnx), load_external_data=False))
        metadata["edge_build.quantization"] = settings
        if fold is not None:
            metadata["edge_build.input"] = uint8_input_spec(preprocessing.size, fold)
        set_metadata(model, metadata)
        with atomic.atomic_path(int8_path) as tmp:
            onnx.save(model, str(tmp))
        sample_runner = OnnxRunner(int8_path, threads=1)
        quant_graph.check_quantized(int8_path, model_inputs(sample_runner, calibration.paths[:2], preprocessing))

        say(f"quantize: accuracy gate on {len(val_images)} validation images (fp32 vs int8)")
        threads = profile.runtime.threads
        fp32_runner = OnnxRunner(fp32_onnx, threads=threads)
        int8_runner = OnnxRunner(int8_path, threads=threads)
        fp32_logits = run_batched(fp32_runner, model_inputs(fp32_runner, val_images, preprocessing))
        int8_logits = run_batched(int8_runner, model_inputs(int8_runner, val_images, preprocessing))
        fp32_top1, int8_top1 = top1(fp32_logits, val_labels), top1(int8_logits, val_labels)
        result = QuantizeResult(
            int8_onnx=int8_path,
            int8_ort=None,
            fp32_top1=round(fp32_top1, 4),
            int8_top1=round(int8_top1, 4),
            drop_pt=round(fp32_top1 - int8_top1, 4),
            max_drop_pt=profile.budget.max_accuracy_drop_pt,
            agreement=round(float(np.mean(fp32_logits.argmax(1) == int8_logits.argmax(1))), 4),
            val_images=len(val_images),
            fp32_bytes=fp32_onnx.stat().st_size,
            int8_bytes=int8_path.stat().st_size,
            settings={**settings, "uint8_input": fold, "bias_correction_applied": correction},
        )
        if not result.passed:
            from edge_build.sensitivity import rank_sensitive_nodes

            say("quantize: accuracy gate failed; ranking nodes by quantization sensitivity")
            batch = preprocessing.prepare_batch(list(val_images[:16]))
            result.sensitivity = rank_sensitive_nodes(prepared_path, qdq_path, batch)
            report = atomic.write_json(directory / REPORT, {"schema": SCHEMA, **_portable(result)})
            int8_path.unlink(missing_ok=True)  # a failed model must not look like a finished artifact
            raise AccuracyGateFailed(result, report)
    if "ort_int8" in profile.artifacts:
        from edge_build.ort_format import convert_to_ort

        say("quantize: converting the int8 model to ORT format")
        result.int8_ort = convert_to_ort(int8_path, directory, name=INT8_ORT)
        check_runner = OnnxRunner(result.int8_ort, threads=threads)
        ort_logits = run_batched(check_runner, model_inputs(check_runner, val_images, preprocessing))
        if not np.array_equal(ort_logits.argmax(1), int8_logits.argmax(1)):
            raise CheckFailed(f"{result.int8_ort}: the ORT-format model disagrees with {int8_path.name} on top-1")
    outputs = [output.name for output in model.graph.output]
    publish_artifacts(directory, result, UINT8_NHWC if fold is not None else FLOAT_NCHW, outputs)
    atomic.write_json(directory / REPORT, {"schema": SCHEMA, **_portable(result)})
    return result


def uint8_input_spec(size: int, fold: dict[str, Any]) -> dict[str, Any]:
    """The `edge_build.input` metadata of an int8 model that takes raw pixels."""
    return {
        "name": fold["input"],
        "format": UINT8_NHWC,
        "dtype": "uint8",
        "shape": ["batch", size, size, 3],
        "preprocessing_in_graph": True,
        "note": "raw RGB pixels resized to size x size; the scaling is the first layer's input quantization",
    }


def publish_artifacts(directory: Path, result: QuantizeResult, input_format: str, outputs: list[str]) -> Path:
    """`artifacts.json` in the stage directory, the listing `export.find_artifacts` reads."""
    from edge_build.export import ARTIFACTS_FILE, ARTIFACTS_SCHEMA

    entries = {"onnx_int8": {"file": result.int8_onnx.name, "input_format": input_format, "outputs": outputs}}
    if result.int8_ort is not None:
        entries["ort_int8"] = {"file": result.int8_ort.name, "input_format": input_format, "outputs": outputs}
    return atomic.write_json(directory / ARTIFACTS_FILE, {"schema": ARTIFACTS_SCHEMA, "artifacts": entries})
