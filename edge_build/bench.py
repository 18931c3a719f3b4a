"""Stage `bench`: latency, memory, load time and top-1 of every artifact of a target.

Each subject (an artifact in its runtime, or a reference row) runs in its own child
process (`edge_build.bench_child`), loaded once and kept alive for the whole run. The
parent steps the children one at a time over pipes: for every batch size, after a
warm-up, `rounds` rounds in which each child measures one slice of runs (A B C, A B C,
...). So slow drift of the machine (other jobs, thermal, frequency) lands on every
subject alike, no two subjects ever compete for the cores, and each child's load time
and peak memory are its own. A waiting child is stopped (SIGSTOP): ONNX Runtime's worker
threads keep spinning after a call, and a waiting ORT child was measured taking about 3 %
of a core during the other children's slices (0 % when stopped). The first run of every
slice is discarded: it pays for the caches the previous child evicted (measured about
10 % slower than the following runs for ORT fp32).

Reference rows, same run, same threads: the trained MindSpore network on the CPU
(BatchNorm folded, the speed configuration) and Google's int8 MobileNetV2 in LiteRT
(XNNPACK). Every artifact's p50 is reported as a ratio to both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic, history
from edge_build.bench_child import Child, child_env
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.preprocessing import Preprocessing
from edge_build.provenance import git_commit, provenance

STAGE = "bench"
SCHEMA = 1
BENCH_JSON = "bench.json"
#: Google's int8 MobileNetV2, next to the backbone weights in the shared weights folder.
LITERT_REFERENCE = "tf2_mobilenet_v2_1.0_224_ptq.tflite"
MINDSPORE_ROW = "mindspore"
LITERT_ROW = "litert"
ACCURACY_BATCH = 32
_RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".ort": "onnxruntime", ".mindir": "mindir", ".tflite": "litert"}

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchSettings:
    """How to measure. `runs` and `min_time_s` are both targets per subject and batch size;
    `max_time_s` caps a slow subject (its row then has fewer runs, as recorded)."""

    target: str = "custom"
    threads: int = 2
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int = 100
    min_time_s: float = 0.0
    max_time_s: float = 2.0
    rounds: int = 5
    latency_budget_ms: float | None = None
    latency_budget_batch: int = 1

    @classmethod
    def from_target(cls, profile: Any, **overrides: Any) -> BenchSettings:
        """From a `edge_build.targets.TargetProfile` (or an existing BenchSettings)."""
        if isinstance(profile, BenchSettings):
            return replace(profile, **overrides)
        values = {
            "target": profile.name,
            "threads": profile.runtime.threads,
            "providers": tuple(profile.runtime.providers),
            "batch_sizes": tuple(profile.bench.batch_sizes),
            "warmup": profile.bench.warmup,
            "runs": profile.bench.runs,
            "min_time_s": profile.bench.min_time_s,
            "latency_budget_ms": profile.budget.latency_ms,
            "latency_budget_batch": profile.budget.latency_batch,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def wants_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.providers

    @property
    def rounds_used(self) -> int:
        return max(1, min(self.rounds, self.runs))


@dataclass
class Latency:
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_ips: float
    #: Half the range of the per-round medians: how far this run's p50 moves by itself.
    spread_ms: float
    round_p50_ms: list[float]

    @classmethod
    def from_rounds(cls, batch: int, rounds: list[list[float]]) -> Latency:
        """Statistics of per-run times (ms), grouped by round."""
        times = np.array([t for r in rounds for t in r], dtype=np.float64)
        if times.size == 0:
            raise ValueError("no timings")
        medians = [float(np.median(r)) for r in rounds if r]
        mean = float(times.mean())
        return cls(
            batch=batch,
            runs=int(times.size),
            p50_ms=float(np.percentile(times, 50)),
            p90_ms=float(np.percentile(times, 90)),
            p99_ms=float(np.percentile(times, 99)),
            mean_ms=mean,
            std_ms=float(times.std(ddof=1)) if times.size > 1 else 0.0,
            min_ms=float(times.min()),
            max_ms=float(times.max()),
            throughput_ips=batch * 1000.0 / mean if mean > 0 else 0.0,
            spread_ms=(max(medians) - min(medians)) / 2.0,
            round_p50_ms=medians,
        )


@dataclass
class SubjectResult:
    """One row group of the table: an artifact (or a reference) in its runtime."""

    name: str
    role: str  # "artifact" | "reference"
    runtime: str
    device: str
    path: str | None
    sha256: str | None
    size_bytes: int | None
    input_format: str
    input_size: int
    load_ms: float
    first_run_ms: float | None
    peak_rss_mb: float
    baseline_rss_mb: float
    latency: dict[int, Latency] = field(default_factory=dict)
    ratios: dict[int, dict[str, float]] = field(default_factory=dict)
    top1: float | None = None
    accuracy_images: int = 0
    idle_cpu_s: float = 0.0
    within_budget: bool | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["latency"] = {str(b): asdict(v) for b, v in self.latency.items()}
        payload["ratios"] = {str(b): v for b, v in self.ratios.items()}
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> SubjectResult:
        values = dict(payload)
        values["latency"] = {int(b): Latency(**v) for b, v in payload.get("latency", {}).items()}
        values["ratios"] = {int(b): v for b, v in payload.get("ratios", {}).items()}
        return cls(**values)


@dataclass
class BenchReport:
    target: str
    settings: dict[str, Any]
    machine_id: str
    machine: dict[str, Any]
    created: str
    duration_s: float
    load_average: dict[str, list[float]]
    results: list[SubjectResult]
    method: str
    refused: str | None = None
    comparison: list[history.Change] = field(default_factory=list)
    previous: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    history_path: Path | None = None
    #: (batch, round, subject) in the order the slices ran (not serialized; tests read it).
    schedule: list[tuple[int, int, str]] = field(default_factory=list)

    def result(self, name: str) -> SubjectResult:
        for row in self.results:
            if row.name == name:
                return row
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "target": self.target,
            "created": self.created,
            "duration_s": round(self.duration_s, 2),
            "machine_id": self.machine_id,
            "machine": self.machine,
            "load_average": self.load_average,
            "settings": self.settings,
            "method": self.method,
            "refused": self.refused,
            "provenance": self.provenance,
            "results": [row.as_dict() for row in self.results],
            "previous": self.previous,
            "comparison": [change.as_dict() for change in self.comparison],
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any], path: Path | None = None) -> BenchReport:
        if payload.get("schema") != SCHEMA:
            raise EdgeBuildError(f"{path}: unknown bench.json schema {payload.get('schema')!r}", "rerun the benchmark")
        return cls(
            target=payload["target"],
            settings=payload["settings"],
            machine_id=payload["machine_id"],
            machine=payload["machine"],
            created=payload["created"],
            duration_s=payload["duration_s"],
            load_average=payload["load_average"],
            results=[SubjectResult.from_dict(r) for r in payload["results"]],
            method=payload["method"],
            refused=payload.get("refused"),
            comparison=[
                history.Change(**{k: v for k, v in c.items() if k != "change_pct"})
                for c in payload.get("comparison", [])
            ],
            previous=payload.get("previous"),
            provenance=payload.get("provenance", {}),
            path=path,
        )


METHOD = (
    "one child process per subject, loaded once; slices of runs stepped one child at a time over pipes, "
    "waiting children stopped (SIGSTOP) so their runtime threads cannot run; "
    "interleaved in rounds (A B C, A B C, ...) per batch size after a warm-up; first run of every slice "
    "discarded (cache re-warm after the switch); wall-clock time per run() call incl. input/output copies; "
    "spread = half the range of the per-round medians"
)


# --- subjects --------------------------------------------------------------------------------------


@dataclass
class Subject:
    name: str
    role: str
    runtime: str
    spec: dict[str, Any]
    path: Path | None = None
    accuracy: bool = True
    notes: list[str] = field(default_factory=list)


def runtime_for(path: Path) -> str:
    runtime = _RUNTIME_BY_SUFFIX.get(Path(path).suffix)
    if runtime is None:
        raise EdgeBuildError(
            f"{path}: no benchmark runtime for '{Path(path).suffix}' files", f"expected {', '.join(_RUNTIME_BY_SUFFIX)}"
        )
    return runtime


def artifact_subject(name: str, path: Path, settings: BenchSettings, preprocessing: Preprocessing) -> Subject:
    path = Path(path)
    if not path.is_file():
        raise EdgeBuildError(
            f"artifact '{name}' not found: {path}", "build it first with `edge-build all --target ...`"
        )
    runtime = runtime_for(path)
    spec: dict[str, Any] = {"runtime": runtime, "path": str(path), "threads": settings.threads}
    if runtime == "onnxruntime":
        spec["providers"] = list(settings.providers)
    return Subject(name, "artifact", runtime, {**spec, "preprocessing": preprocessing.as_dict()}, path)


def mindspore_subject(build_dir: Path, settings: BenchSettings, preprocessing: Preprocessing) -> Subject:
    return Subject(
        MINDSPORE_ROW,
        "reference",
        "mindspore",
        {
            "runtime": "factory",
            "factory": "edge_build.bench_child:mindspore_reference",
            "args": {"build_dir": str(build_dir), "threads": settings.threads},
            "threads": settings.threads,
            "preprocessing": preprocessing.as_dict(),
        },
        notes=["trained network in MindSpore on the CPU: BatchNorm folded, compiled after warm-up (fold_batchnorm)"],
    )


def reference_build_dir(reference: Path | Any) -> Path:
    """The build directory of a `TrainedModel` (its `directory` is <build>/train) or a path."""
    directory = getattr(reference, "directory", None)
    return Path(directory).parent if directory is not None else Path(reference)


def litert_subject(path: Path, settings: BenchSettings) -> Subject:
    return Subject(
        LITERT_ROW,
        "reference",
        "litert",
        {"runtime": "litert", "path": str(path), "threads": settings.threads},
        Path(path),
        accuracy=False,
        notes=["Google's int8 MobileNetV2 (ImageNet head): latency only; batch N = N batch-1 invokes"],
    )


@contextlib.contextmanager
def _children(subjects: list[Subject], settings: BenchSettings, log: Log) -> Iterator[list[Child]]:
    """Start the children one after another (so each load is timed alone); always stop them."""
    env = child_env(settings.threads)
    children: list[Child] = []
    try:
        for subject in subjects:
            log(f"bench: loading {subject.name} ({subject.runtime})")
            children.append(Child(subject.name, subject.spec, env))
        yield children
    finally:
        for child in children:
            child.close()


# --- validation images -----------------------------------------------------------------------------


class ValImages:
    """The validation split resized once per input size, as uint8 NHWC `.npy` files for the children."""

    def __init__(self, data_root: Path | None, preprocessing: Preprocessing, scratch: Path) -> None:
        self.data_root = data_root
        self.preprocessing = preprocessing
        self.scratch = scratch
        self.refs: list[Any] = []
        if data_root is not None:
            from edge_build.dataset import list_split

            self.refs = list_split(Path(data_root), "val")
        self._files: dict[int, Path] = {}

    @property
    def labels(self) -> list[int]:
        return [ref.label for ref in self.refs]

    def file(self, size: int) -> str | None:
        if not self.refs:
            return None
        if size not in self._files:
            from edge_build.images import load_rgb

            resize = replace(self.preprocessing, size=size)
            pool = np.stack([resize.resize_rgb(load_rgb(ref.path)) for ref in self.refs])
            self._files[size] = atomic.write_npy(self.scratch / f"val_{size}.npy", pool)
        return str(self._files[size])


# --- measurement -----------------------------------------------------------------------------------


def _input_size(ready: dict[str, Any]) -> int:
    shape = ready["input_shape"]
    return int(shape[1] if ready["input_format"] == "float_nchw" else shape[0])


def _device(ready: dict[str, Any]) -> str:
    providers = ready.get("providers") or []
    return providers[0].removesuffix("ExecutionProvider") if providers else "CPU"


def _check_providers(subject: Subject, ready: dict[str, Any], settings: BenchSettings) -> None:
    """ONNX Runtime falls back to the CPU silently when CUDA fails to start: refuse that."""
    if subject.runtime == "onnxruntime" and ready["providers"][:1] != list(settings.providers[:1]):
        raise EdgeBuildError(
            f"benchmark of '{subject.name}': asked for {settings.providers[0]} but ONNX Runtime runs it on "
            f"{', '.join(ready['providers'])}",
            "refusing to report those timings under this target; fix the GPU runtime (onnxruntime-gpu, CUDA)",
        )


def _measure(children: list[Child], settings: BenchSettings, images: ValImages, log: Log) -> dict[str, Any]:
    """Warm-up, then interleaved rounds, per batch size. Returns per-subject rounds and the schedule."""
    rounds = settings.rounds_used
    per_slice = math.ceil(settings.runs / rounds)
    timings: dict[str, dict[int, list[list[float]]]] = {c.name: {} for c in children}
    first_run: dict[str, float | None] = {}
    schedule: list[tuple[int, int, str]] = []
    for batch in settings.batch_sizes:
        log(f"bench: batch {batch}: warm-up ({settings.warmup} runs each), then {rounds} interleaved rounds")
        for child in children:
            pool = images.file(_input_size(child.ready))
            reply = child.request(
                "warmup", batch=batch, runs=settings.warmup, max_time_s=settings.max_time_s, images=pool
            )
            first_run.setdefault(child.name, reply.get("first_run_ms"))
        for index in range(rounds):
            for child in children:
                reply = child.request(
                    "measure",
                    batch=batch,
                    runs=per_slice + 1,
                    min_time_s=settings.min_time_s / rounds,
                    max_time_s=settings.max_time_s / rounds,
                    images=images.file(_input_size(child.ready)),
                )
                times_ms = [t / 1e6 for t in reply["times_ns"]]
                kept = times_ms[1:] if len(times_ms) > 1 else times_ms
                timings[child.name].setdefault(batch, []).append(kept)
                schedule.append((batch, index, child.name))
    return {"timings": timings, "first_run": first_run, "schedule": schedule}


def _accuracy(child: Child, subject: Subject, images: ValImages) -> tuple[float | None, int, str | None]:
    if not images.refs or not subject.accuracy:
        return None, 0, None
    batch = child.ready["static_batch"] or ACCURACY_BATCH
    reply = child.request("accuracy", images=images.file(_input_size(child.ready)), batch=batch)
    if reply["classes"] != 26:
        return None, 0, f"top-1 not computed: the output has {reply['classes']} classes, not 26"
    labels = images.labels
    correct = sum(int(p == y) for p, y in zip(reply["predictions"], labels, strict=True))
    return 100.0 * correct / len(labels), len(labels), None


def _ratios(results: list[SubjectResult]) -> None:
    references = {row.name: row for row in results if row.role == "reference"}
    for row in results:
        for batch, latency in row.latency.items():
            ratios = {}
            for ref_name, ref in references.items():
                if ref is not row and batch in ref.latency and ref.latency[batch].p50_ms > 0:
                    ratios[f"vs_{ref_name}"] = latency.p50_ms / ref.latency[batch].p50_ms
            if ratios:
                row.ratios[batch] = ratios


def _budget(row: SubjectResult, settings: BenchSettings) -> bool | None:
    if row.role != "artifact" or settings.latency_budget_ms is None:
        return None
    latency = row.latency.get(settings.latency_budget_batch)
    return None if latency is None else latency.p50_ms <= settings.latency_budget_ms


def _row(subject: Subject, child: Child, measured: dict[str, Any], images: ValImages, log: Log) -> SubjectResult:
    """Collect one subject's figures from its child: memory first, then top-1 (bigger batches)."""
    ready = child.ready
    memory = child.request("memory")
    if subject.accuracy and images.refs:
        log(f"bench: top-1 of {subject.name} on {len(images.refs)} val images")
    top1, count, note = _accuracy(child, subject, images)
    notes = list(subject.notes) + ([note] if note else [])
    if ready["static_batch"] and subject.runtime != "litert":
        notes.append(f"static batch {ready['static_batch']}: larger batches run in chunks")
    return SubjectResult(
        name=subject.name,
        role=subject.role,
        runtime=subject.runtime,
        device=_device(ready),
        path=str(subject.path) if subject.path else None,
        sha256=sha256_file(subject.path) if subject.path else None,
        size_bytes=subject.path.stat().st_size if subject.path else None,
        input_format=ready["input_format"],
        input_size=_input_size(ready),
        load_ms=ready["load_ms"],
        first_run_ms=measured["first_run"].get(subject.name),
        peak_rss_mb=memory["peak_rss_kb"] / 1024.0,
        baseline_rss_mb=ready["baseline_rss_kb"] / 1024.0,
        latency={b: Latency.from_rounds(b, rounds) for b, rounds in measured["timings"][subject.name].items()},
        top1=top1,
        accuracy_images=count,
        notes=notes,
    )


def measure_subjects(
    subjects: list[Subject],
    settings: BenchSettings,
    data_root: Path | None,
    preprocessing: Preprocessing,
    log: Log,
) -> tuple[list[SubjectResult], list[tuple[int, int, str]]]:
    """Run every subject in its child process; the results in subject order plus the slice schedule."""
    with tempfile.TemporaryDirectory(prefix="edge-build-bench-") as scratch:
        images = ValImages(data_root, preprocessing, Path(scratch))
        with _children(subjects, settings, log) as children:
            for subject, child in zip(subjects, children, strict=True):
                _check_providers(subject, child.ready, settings)
            cpu_start = {c.name: c.cpu_s() - c.busy_cpu_s for c in children}
            started = time.perf_counter()
            measured = _measure(children, settings, images, log)
            measuring_s = time.perf_counter() - started
            # CPU a child used outside its own requests ran while another child was being timed.
            idle = {c.name: max(0.0, c.cpu_s() - c.busy_cpu_s - cpu_start[c.name]) for c in children}
            results = [
                _row(subject, child, measured, images, log) for subject, child in zip(subjects, children, strict=True)
            ]
    for row in results:
        row.idle_cpu_s = idle[row.name]
        if row.idle_cpu_s > 0.05 * measuring_s:
            row.notes.append(
                f"used {row.idle_cpu_s:.2f} s of CPU while waiting for its turn "
                f"({100 * row.idle_cpu_s / measuring_s:.0f} % of the measuring time): it may have slowed the others"
            )
        row.within_budget = _budget(row, settings)
    _ratios(results)
    return results, measured["schedule"]


# --- the stage -------------------------------------------------------------------------------------


def gpu_refusal(settings: BenchSettings) -> str | None:
    """Why GPU latency cannot be measured here, or None when the CUDA provider is present."""
    if not settings.wants_cuda:
        return None
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return None
    return (
        f"target '{settings.target}' measures latency on CUDAExecutionProvider, which this machine does not have "
        f"(ONNX Runtime offers {', '.join(available)}); refusing to report CPU timings as GPU latency"
    )


def check_device(settings: BenchSettings) -> None:
    """Raise when the target's latency must be measured on a GPU this machine does not have."""
    refusal = gpu_refusal(settings)
    if refusal:
        raise EdgeBuildError(
            refusal,
            f"run `edge-build bench --target {settings.target}` on a machine with an NVIDIA GPU and "
            "`pip install edge-build[gpu]`; the artifacts themselves are built and verified on the CPU",
        )


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _history_latency(results: list[SubjectResult]) -> dict[str, dict[str, Any]]:
    return {
        row.name: {
            str(batch): {
                "p50_ms": round(lat.p50_ms, 4),
                "spread_ms": round(lat.spread_ms, 4),
                "p90_ms": round(lat.p90_ms, 4),
                "mean_ms": round(lat.mean_ms, 4),
                "runs": lat.runs,
            }
            for batch, lat in row.latency.items()
        }
        for row in results
    }


def _subjects(
    artifacts: Mapping[str, Path],
    reference: Path | Any | None,
    litert_reference: Path | None,
    settings: BenchSettings,
    preprocessing: Preprocessing,
    say: Log,
) -> tuple[list[Subject], str | None]:
    """The artifacts, then the MindSpore and LiteRT rows; plus the reference checkpoint's sha256."""
    subjects = [artifact_subject(name, Path(path), settings, preprocessing) for name, path in artifacts.items()]
    reference_sha256 = None
    if reference is not None:
        from edge_build.trained import load_trained

        build_dir = reference_build_dir(reference)
        reference_sha256 = sha256_file(load_trained(build_dir).checkpoint)
        subjects.append(mindspore_subject(build_dir, settings, preprocessing))
    if litert_reference is not None and importlib.util.find_spec("ai_edge_litert") is None:
        say("bench: no LiteRT reference row (ai-edge-litert is not installed: pip install ai-edge-litert)")
        litert_reference = None
    if litert_reference is not None:
        if not Path(litert_reference).is_file():
            raise EdgeBuildError(
                f"LiteRT reference model not found: {litert_reference}",
                f"it is {LITERT_REFERENCE} in the shared weights folder (pass --weights to point there)",
            )
        subjects.append(litert_subject(Path(litert_reference), settings))
    return subjects, reference_sha256


def _append_history(report: BenchReport, settings: BenchSettings, history_dir: Path) -> None:
    """Compare with the previous record of this machine and target, then append this run's."""
    results = report.results
    record = history.new_record(
        settings.target,
        git_commit(),
        {r.name: {"sha256": r.sha256, "size": r.size_bytes, "runtime": r.runtime, "role": r.role} for r in results},
        _history_latency(results),
    )
    record["top1"] = {r.name: r.top1 for r in results if r.top1 is not None}
    record["threads"] = settings.threads
    record["load_average"] = report.load_average.get("before", [])
    previous = history.previous_record(history_dir, report.machine_id, settings.target)
    if previous is not None:
        report.previous = {k: previous.get(k) for k in ("date", "git_commit", "artifacts")}
        report.comparison = history.compare(previous, record)
    history.append_record(history_dir, record)


def run_bench(
    target: Any,
    artifacts: Mapping[str, Path],
    reference: Path | Any | None,
    data_root: Path | None,
    out_dir: Path,
    history_dir: Path | None,
    *,
    litert_reference: Path | None = None,
    preprocessing: Preprocessing | None = None,
    force: bool = False,
    require_device: bool = True,
    log: Log | None = None,
    **overrides: Any,
) -> BenchReport:
    """Benchmark `artifacts` (name -> file) for `target` (a TargetProfile or BenchSettings).

    `reference`: the trained network for the MindSpore row (a `TrainedModel`, or the build directory
    `edge_build.trained.load_trained` reads), or None to leave that row out. `litert_reference`: Google's int8
    MobileNetV2 `.tflite`, or None. `data_root`: the data set for top-1 on its val split, or None.
    `preprocessing`: for float-input artifacts; default the trained model's (or the default one).
    Writes `out_dir/bench.json` (a cached stage: unchanged inputs are not measured again unless
    `force`) and appends one record to `history_dir/<machine-id>.jsonl`. A GPU target on a machine
    without CUDA raises, or with `require_device=False` returns a report that says it refused.
    `overrides` replace BenchSettings fields (e.g. `max_time_s=1.0` for a quicker run).
    """
    from edge_build.stages import run_stage

    settings = BenchSettings.from_target(target, **overrides)
    if preprocessing is None and reference is not None:
        from edge_build.trained import load_trained

        preprocessing = load_trained(reference_build_dir(reference)).preprocessing  # travels with the weights
    preprocessing = preprocessing or Preprocessing()
    out_dir = Path(out_dir)
    say = log or (lambda _: None)
    refusal = gpu_refusal(settings)
    if require_device:
        check_device(settings)
    description = history.machine()
    machine_key = history.machine_id(description)
    schedule: list[tuple[int, int, str]] = []

    subjects, reference_sha256 = _subjects(artifacts, reference, litert_reference, settings, preprocessing, say)
    inputs = {
        "schema": SCHEMA,
        "settings": asdict(settings),
        "machine_id": machine_key,
        "subjects": {
            s.name: {"runtime": s.runtime, "sha256": sha256_file(s.path) if s.path else None, "spec": s.spec}
            for s in subjects
        },
        "reference_checkpoint": reference_sha256,
        "data_root": str(data_root) if data_root else None,
        "refused": refusal,
    }

    def produce(directory: Path) -> dict[str, Any]:
        started = time.perf_counter()
        load_before = _load_average()
        results: list[SubjectResult] = []
        if refusal is None:
            if load_before and load_before[0] > 0.5 * (os.cpu_count() or 1):
                say(f"bench: machine busy (load average {load_before[0]}): expect noisy figures")
            results, order = measure_subjects(subjects, settings, data_root, preprocessing, say)
            schedule.extend(order)
        report = BenchReport(
            target=settings.target,
            settings=asdict(settings),
            machine_id=machine_key,
            machine=description,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            duration_s=time.perf_counter() - started,
            load_average={"before": load_before, "after": _load_average()},
            results=results,
            method=METHOD,
            refused=refusal,
            provenance=provenance(),
        )
        if history_dir is not None and results:
            _append_history(report, settings, Path(history_dir))
        atomic.write_json(directory / BENCH_JSON, report.as_dict())
        return {"refused": refusal, "subjects": [r.name for r in results]}

    result = run_stage(f"{STAGE}-{settings.target}", out_dir, inputs, produce, force=force, log=log)
    report = load_report(result.path(BENCH_JSON))
    report.schedule = schedule
    if history_dir is not None:
        report.history_path = history.history_file(Path(history_dir), machine_key)
    return report


def load_report(path: Path) -> BenchReport:
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"cannot read {path}: {exc}", "rerun `edge-build bench`") from exc
    return BenchReport.from_dict(payload, Path(path))


# --- rendering -------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(report: BenchReport) -> str:
    """The terminal table: one line per subject and batch size."""
    if report.refused:
        return f"bench {report.target}: {report.refused}"
    header = (
        "artifact",
        "runtime",
        "dev",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean±std ms",
        "min ms",
        "img/s",
        "runs",
        "x MindSpore",
        "x LiteRT",
        "size MB",
        "load ms",
        "RSS MB",
        "top-1 %",
    )
    rows = []
    for row in report.results:
        for index, (batch, lat) in enumerate(sorted(row.latency.items())):
            ratios = row.ratios.get(batch, {})
            first = index == 0
            rows.append(
                (
                    row.name if first else "",
                    row.runtime if first else "",
                    row.device if first else "",
                    str(batch),
                    _fmt(lat.p50_ms, 3),
                    _fmt(lat.p90_ms, 3),
                    _fmt(lat.p99_ms, 3),
                    f"{lat.mean_ms:.3f}±{lat.std_ms:.3f}",
                    _fmt(lat.min_ms, 3),
                    _fmt(lat.throughput_ips, 1),
                    str(lat.runs),
                    _fmt(ratios.get(f"vs_{MINDSPORE_ROW}")),
                    _fmt(ratios.get(f"vs_{LITERT_ROW}")),
                    _fmt(row.size_bytes / 1e6 if first and row.size_bytes else None),
                    _fmt(row.load_ms, 0) if first else "",
                    _fmt(row.peak_rss_mb, 0) if first else "",
                    _fmt(row.top1, 1) if first else "",
                )
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    ]
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    load = report.load_average.get("before") or ["?"]
    lines.append(
        f"{report.machine['cpu']}, {report.machine['cores']} cores, load {load[0]}; "
        f"{report.settings['threads']} threads; {report.duration_s:.1f} s"
    )
    for row in report.results:
        for note in row.notes:
            lines.append(f"  {row.name}: {note}")
        if row.within_budget is False:
            lines.append(f"  {row.name}: p50 over the latency budget of {report.settings['latency_budget_ms']} ms")
    return "\n".join(lines)


def render_comparison(report: BenchReport, pct: float | None = None) -> str:
    if report.previous is None:
        return "compare: no previous record of this target on this machine"
    prev = report.previous
    lines = [f"compare with {prev.get('date')} (commit {str(prev.get('git_commit'))[:12]}):"]
    if pct is not None:
        lines.append(
            f"  regression: p50 > before x machine x {1 + pct / 100:g} + spread "
            "(machine: how much the unchanged LiteRT reference slowed down; spread: both runs' round-to-round wobble)"
        )
    for change in report.comparison:
        verdict = ""
        if pct is not None:
            verdict = "  REGRESSION" if change.regressed(pct) else "  ok"
        if change.role != "artifact":
            verdict = "  (reference)"
        lines.append(
            f"  {change.artifact:<16} batch {change.batch:<4} {change.before_ms:9.3f} -> {change.now_ms:9.3f} ms "
            f"({change.change_pct:+6.1f} %, spread ±{change.noise_ms:.3f} ms, machine x{change.machine:.2f}){verdict}"
        )
    return "\n".join(lines)
