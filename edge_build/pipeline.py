"""`edge-build all`: every stage a target needs, then one self-describing bundle.

Each stage caches itself (edge_build.stages), so a rerun with nothing changed only
re-checks hashes. The bundle is assembled in a staging directory and swapped in at
the end: a failing stage leaves the previous good bundle untouched. The report is
written last, also after a failure, and says what failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_build import atomic, bundle
from edge_build.config import Settings
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.hashing import fingerprint, sha256_file
from edge_build.locking import build_lock

Log = Callable[[str], None]
HISTORY_DIR = Path("benchmarks") / "history"


@dataclass
class BuildOptions:
    target: str = "lite"
    out: Path | None = None
    finetune: bool = False
    blocks: int | None = None
    search: bool = False
    bench: bool = True
    wait_s: float = 0.0
    history_dir: Path | None = None


@dataclass
class BuildOutcome:
    target: str
    bundle_dir: Path
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    stages_run: list[str] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)


class _Progress:
    """Remembers which stage is running, so a failure can be attributed to it."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.current = "setup"

    def enter(self, name: str) -> None:
        self.current = name
        self.log(f"== {name}")


def history_dir(settings: Settings, options: BuildOptions) -> Path:
    if options.history_dir is not None:
        return options.history_dir
    base = settings.config_file.parent if settings.config_file else Path.cwd()
    return base / HISTORY_DIR


def build_all(settings: Settings, options: BuildOptions, log: Log = print) -> BuildOutcome:
    """Run doctor, import, features, train, eval, export, quantize, verify, bench; publish the bundle."""
    from edge_build import stages
    from edge_build.targets import load_target

    started = time.perf_counter()
    profile = load_target(options.target, settings["targets"].require_dir("target profile directory"))
    data_root = settings.data.require_dir("data set")
    weights_file = settings.weights.require_file("backbone weights")
    build = settings.build_dir
    bundle_dir = (options.out or settings.dist_dir) / profile.name
    executed_before = len(stages.EXECUTIONS)
    progress = _Progress(log)
    failure: dict[str, Any] | None = None
    outcome = BuildOutcome(profile.name, bundle_dir, 0.0)
    with build_lock(build, options.wait_s):
        try:
            outcome.metrics = _run_stages(settings, options, profile, data_root, weights_file, bundle_dir, progress)
        except EdgeBuildError as exc:
            failure = _failure(progress.current, exc)
            raise
        except Exception as exc:
            failure = _failure(progress.current, exc)
            raise
        finally:
            outcome.reports = _write_report(settings, options, profile, bundle_dir, failure, log)
    outcome.stages_run = stages.EXECUTIONS[executed_before:]
    outcome.seconds = time.perf_counter() - started
    return outcome


def _failure(stage: str, exc: BaseException) -> dict[str, Any]:
    from edge_build.report import failure_from

    return failure_from(stage, exc)


def _write_report(
    settings: Settings, options: BuildOptions, profile: Any, bundle_dir: Path, failure: dict | None, log: Log
) -> list[Path]:
    from edge_build.report import write_report

    try:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        with bundle.publish_lock(bundle_dir):
            return write_report(
                bundle_dir,
                target=profile.name,
                build_dir=settings.build_dir,
                data_dir=settings.data.path,
                history_dir=history_dir(settings, options),
                failure=failure,
                max_accuracy_drop_pt=profile.budget.max_accuracy_drop_pt,
            )
    except Exception as exc:  # the report must never hide the build's own error
        log(f"report: could not be written ({exc})")
        return []


def _run_stages(
    settings: Settings,
    options: BuildOptions,
    profile: Any,
    data_root: Path,
    weights_file: Path,
    bundle_dir: Path,
    progress: _Progress,
) -> dict[str, Any]:
    from edge_build import export, verify
    from edge_build.doctor import run_doctor
    from edge_build.evaluation import evaluate
    from edge_build.features import extract_features
    from edge_build.resolution import choose_resolution
    from edge_build.training import TrainOptions, train_head
    from edge_build.weights import import_weights

    log, build = progress.log, settings.build_dir

    progress.enter("doctor")
    doctor = run_doctor(data_root, progress=False)
    doctor_json = atomic.write_json(build / "doctor" / "doctor.json", doctor.to_json())
    for finding in doctor.warnings:
        log(f"doctor: warning: {finding.message}")
    if doctor.errors:
        first = doctor.errors[0]
        raise CheckFailed(
            f"data set {data_root} has {len(doctor.errors)} error finding(s), first: {first.message}",
            "run `edge-build doctor` for the full report and fix the data",
        )

    progress.enter("weights")
    imported = import_weights(weights_file, build)

    resolution = None
    if len(set(profile.resolution.candidates)) > 1:
        progress.enter("resolution")
        resolution = choose_resolution(data_root, imported, build, profile, log=log)
        log(f"resolution: {resolution.summary()}")
        imported = imported.at_size(resolution.size)

    progress.enter("features")
    features = extract_features(data_root, imported, build, progress=False, log=log)

    if options.finetune:
        progress.enter("finetune")  # trains its own head first, then the backbone's last stages
        training = _finetune(settings, options, data_root, imported, features, log)
    else:
        progress.enter("train")
        head = TrainOptions(search=options.search)
        training = train_head(features, imported, build, head, progress=False, log=log, data_root=data_root)

    progress.enter("eval")
    evaluation = evaluate(features, data_root, build, progress=False, log=log)

    progress.enter("export")
    exported = export.stage(build, log=log)
    artifacts = _target_artifacts(settings, profile, data_root, exported, progress)

    progress.enter("verify")
    verify_dir = build / f"verify-{profile.name}"
    parity = verify.stage(build, data_root, artifacts=artifacts, parity=profile.parity, log=log, directory=verify_dir)
    if verify.exit_code(parity) != 0:
        raise CheckFailed(
            f"parity check failed for target '{profile.name}': " + _failed_artifacts(parity),
            f"see {verify_dir / 'parity.json'}; `edge-build verify --target {profile.name}` shows the diagnosis",
        )

    bench_json = None
    if options.bench:
        progress.enter("bench")
        bench_json = _bench(settings, options, profile, artifacts, data_root, log)

    progress.enter("bundle")
    with bundle.publish_lock(bundle_dir):  # another build may publish to the same --out
        return _publish(
            settings,
            profile,
            bundle_dir,
            artifacts,
            imported,
            data_root,
            files={
                "doctor.json": doctor_json,
                "training.json": training.directory / "training.json",
                "eval.json": build / "eval" / "eval.json",
                "parity.json": verify_dir / "parity.json",
                "bench.json": bench_json,
                "resolution.json": resolution.path if resolution else None,
            },
            metrics=_headline(evaluation, parity, artifacts, imported.preprocessing.size),
            log=log,
        )


def _failed_artifacts(parity: dict[str, Any]) -> str:
    failed = [f"{row['kind']} ({row['status']})" for row in parity.get("artifacts", []) if row["status"] != "pass"]
    return ", ".join(failed) or "see the report"


def _finetune(
    settings: Settings, options: BuildOptions, data_root: Path, imported: Any, features: Any, log: Log
) -> Any:
    from edge_build import finetune

    result = finetune.finetune_stage(
        data_root=data_root,
        weights=imported,
        features=features,
        build_dir=settings.build_dir,
        blocks=options.blocks,
        log=log,
    )
    for line in finetune.summary_lines(result.record["finetune"]):
        log(line)
    return result


def _target_artifacts(
    settings: Settings, profile: Any, data_root: Path, exported: dict[str, Path], progress: _Progress
) -> dict[str, Path]:
    """The artifacts the profile asks for, building the int8 / fp16 / ORT ones from the fp32 export."""
    from edge_build.ort_format import convert_to_ort

    log, build = progress.log, settings.build_dir
    wanted = list(profile.artifacts)
    artifacts: dict[str, Path] = {}
    for kind in ("onnx_fp32", "mindir"):
        if kind in wanted:
            artifacts[kind] = exported[kind]
    if profile.needs_int8:
        progress.enter("quantize")
        result = quantize_for_target(settings, profile, data_root, exported["onnx_fp32"], log)
        log(f"quantize: {result.summary()}")
        if "onnx_int8" in wanted:
            artifacts["onnx_int8"] = result.int8_onnx
        if "ort_int8" in wanted:
            artifacts["ort_int8"] = result.int8_ort or convert_to_ort(result.int8_onnx, build / f"ort-{profile.name}")
    if "ort_fp32" in wanted:
        progress.enter("ort")
        artifacts["ort_fp32"] = _cached_ort(exported["onnx_fp32"], build / f"ort-{profile.name}", log)
    if "onnx_fp16" in wanted:
        progress.enter("fp16")
        from edge_build.fp16 import fp16_stage

        artifacts["onnx_fp16"] = fp16_stage(exported["onnx_fp32"], build / "fp16", log=log)
    missing = [kind for kind in wanted if kind not in artifacts]
    if missing:
        raise EdgeBuildError(f"target '{profile.name}' asks for {missing[0]}, which no stage builds")
    return {kind: artifacts[kind] for kind in wanted}


def _cached_ort(onnx_path: Path, out_dir: Path, log: Log) -> Path:
    from edge_build.export import ARTIFACTS_FILE, ARTIFACTS_SCHEMA
    from edge_build.ort_format import convert_to_ort
    from edge_build.stages import run_stage

    def produce(directory: Path) -> dict[str, Any]:
        ort_file = convert_to_ort(onnx_path, directory)
        listing = {"ort_fp32": {"file": ort_file.name, "input_format": "float_nchw", "outputs": ["logits"]}}
        atomic.write_json(directory / ARTIFACTS_FILE, {"schema": ARTIFACTS_SCHEMA, "artifacts": listing})
        return {"file": ort_file.name}

    result = run_stage("ort", out_dir, {"onnx": sha256_file(onnx_path), "publishes": ARTIFACTS_FILE}, produce, log=log)
    return out_dir / result.info["file"]


def quantize_for_target(
    settings: Settings,
    profile: Any,
    data_root: Path,
    fp32: Path,
    log: Log,
    exclude_nodes: Sequence[str] = (),
    force: bool = False,
) -> Any:
    """Quantize `fp32` for `profile` with the calibration set, gated on the validation split."""
    from edge_build.calibration import ensure_calibration
    from edge_build.dataset import list_split
    from edge_build.onnx_graph import read_metadata
    from edge_build.preprocessing import Preprocessing
    from edge_build.quantize import quantize_model

    metadata = read_metadata(fp32)
    if "edge_build.preprocessing" not in metadata:
        raise EdgeBuildError(f"{fp32}: no edge_build.preprocessing metadata", "export it with `edge-build export`")
    preprocessing = Preprocessing.from_dict(metadata["edge_build.preprocessing"])
    calibration = ensure_calibration(settings["calibration"].path, data_root, log=log)
    val = list_split(data_root, "val")
    return quantize_model(
        fp32,
        calibration,
        preprocessing,
        settings.build_dir / f"quantize-{profile.name}",
        profile,
        [ref.path for ref in val],
        [ref.label for ref in val],
        exclude_nodes=exclude_nodes,
        force=force,
        log=log,
    )


def _bench(
    settings: Settings, options: BuildOptions, profile: Any, artifacts: dict[str, Path], data_root: Path, log: Log
) -> Path:
    from edge_build.bench import run_bench

    out_dir = settings.build_dir / "bench" / profile.name
    litert = settings.weights.path.parent / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
    run_bench(
        profile,
        artifacts,
        settings.build_dir,
        data_root,
        out_dir,
        history_dir(settings, options),
        litert_reference=litert if litert.is_file() else None,
        require_device=False,
        log=log,
    )
    return out_dir / "bench.json"


def _headline(
    evaluation: dict[str, Any], parity: dict[str, Any], artifacts: dict[str, Path], input_size: int
) -> dict[str, Any]:
    headline = {
        key: evaluation.get(key) for key in ("top1", "top5", "bin_accuracy", "n") if evaluation.get(key) is not None
    }
    headline["input_size"] = input_size
    headline["parity"] = parity.get("verdict")
    headline["artifacts"] = sorted(artifacts)
    return headline


def _publish(
    settings: Settings,
    profile: Any,
    bundle_dir: Path,
    artifacts: dict[str, Path],
    imported: Any,
    data_root: Path,
    files: dict[str, Path | None],
    metrics: dict[str, Any],
    log: Log,
) -> dict[str, Any]:
    from edge_build.bundle_readme import bundle_readme
    from edge_build.calibration import calibration_file
    from edge_build.taxonomy import labels_payload

    staging = bundle.staging_dir(bundle_dir)
    artifact_files = {}
    for kind, path in artifacts.items():
        copied = bundle.copy_into(staging, path, _bundle_name(kind, path))
        artifact_files[kind] = copied.name
        sidecar = path.with_name(path.name + ".json")
        if sidecar.is_file():
            bundle.copy_into(staging, sidecar, copied.name + ".json")
    for name, path in files.items():
        if path is not None and Path(path).is_file():
            bundle.copy_into(staging, Path(path), name)
    atomic.write_json(staging / "labels.json", labels_payload())
    preprocessing = imported.preprocessing
    atomic.write_json(staging / "preprocessing.json", preprocessing.as_dict())
    if "mindir" in artifacts and profile.name == "lite":
        _mslite(settings, data_root, staging / artifact_files["mindir"], preprocessing, staging, log)
    atomic.write_text(staging / "README.md", bundle_readme(profile, artifact_files, preprocessing, metrics))
    calibration = calibration_file(settings["calibration"].path, data_root)
    details = {
        "target": profile.name,
        "target_profile": profile.as_dict(),
        "artifacts": artifact_files,
        "data": {
            "root": str(data_root),
            "images_sha256": _data_fingerprint(settings.build_dir),
        },
        "weights": {"file": imported.metadata["source"]["file"], "sha256": imported.sha256},
        "calibration": {"file": calibration.name, "sha256": sha256_file(calibration)}
        if calibration.is_file()
        else None,
        "metrics": metrics,
    }
    bundle.write_manifest(staging, details)
    bundle.publish(staging, bundle_dir)
    log(f"bundle: {bundle_dir}")
    return metrics


def _bundle_name(kind: str, path: Path) -> str:
    """`onnx_int8` -> `model_int8.onnx`, `ort_fp32` -> `model_fp32.ort`, `mindir` -> `model.mindir`."""
    _, _, precision = kind.partition("_")
    return f"model_{precision}{path.suffix}" if precision else f"model{path.suffix}"


def _data_fingerprint(build_dir: Path) -> str | None:
    from edge_build.stages import _load_record

    record = _load_record(build_dir / "features" / "set")
    return fingerprint(record["inputs"]) if record else None


def _mslite(settings: Settings, data_root: Path, mindir: Path, preprocessing: Any, out_dir: Path, log: Log) -> None:
    from edge_build.calibration import ensure_calibration
    from edge_build.mslite import export_mslite_config

    calibration = ensure_calibration(settings["calibration"].path, data_root, log=log)
    export_mslite_config(mindir, calibration, preprocessing, out_dir)
