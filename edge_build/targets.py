"""Target profiles: `targets/<name>.toml`, validated on load.

A profile is data: which artifacts to build, the runtime they run in, how to benchmark
them, how close each kind of artifact must stay to the fp32 network, the latency and
accuracy budgets and the quantization settings. Adding a target is adding a file.
Every problem is reported with the file, the key and what is allowed.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_build.errors import EdgeBuildError

#: artifact -> precision kind (the parity table that judges it)
ARTIFACTS: dict[str, str] = {
    "onnx_fp32": "fp32",
    "onnx_fp16": "fp16",
    "onnx_int8": "int8",
    "ort_fp32": "fp32",
    "ort_int8": "int8",
    "mindir": "mindir",
}
PRECISIONS = ("fp32", "fp16", "int8", "mindir")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("uint8", "int8")
INPUT_FORMATS = ("float_nchw", "uint8_nhwc")


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact's logits must stay to the reference network's on real images."""

    max_abs: float | None = None
    min_cosine: float | None = None
    top1_agreement: float = 1.0


@dataclass(frozen=True)
class Runtime:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 2

    @property
    def wants_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.providers


@dataclass(frozen=True)
class Bench:
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int = 100
    min_time_s: float = 0.0


@dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    latency_batch: int = 1
    max_accuracy_drop_pt: float = 0.5


@dataclass(frozen=True)
class Quantization:
    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    #: 7-bit weights, so x86 U8S8 kernels without VNNI cannot saturate their int16 pair sums
    reduce_range: bool = True
    input_format: str = "float_nchw"
    #: fold the mean output shift of int8 weight rounding into the biases (`bias_correction`)
    bias_correction: bool = True
    #: tried in order when `method` fails the accuracy gate (every attempt is recorded)
    fallback_methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resolution:
    """Input sizes a build may ship; `size` is the reference the accuracy cost is measured against.

    With several candidates the build ships the smallest (fastest) one whose cross-validated
    top-1 is at most `max_accuracy_drop_pt` below the reference's (`edge_build.resolution`).
    """

    size: int = 224
    candidates: tuple[int, ...] = (224,)
    max_accuracy_drop_pt: float | None = None  # None: [budget].max_accuracy_drop_pt

    def max_drop_pt(self, budget: Budget) -> float:
        return budget.max_accuracy_drop_pt if self.max_accuracy_drop_pt is None else self.max_accuracy_drop_pt


DEFAULT_PARITY: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4, top1_agreement=1.0),
    "mindir": Tolerance(max_abs=1e-5, top1_agreement=1.0),
    "fp16": Tolerance(min_cosine=0.9995, top1_agreement=0.99),
    "int8": Tolerance(min_cosine=0.98, top1_agreement=0.95),
}


@dataclass(frozen=True)
class TargetProfile:
    name: str
    path: Path
    description: str
    artifacts: tuple[str, ...]
    runtime: Runtime = field(default_factory=Runtime)
    bench: Bench = field(default_factory=Bench)
    parity: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_PARITY))
    budget: Budget = field(default_factory=Budget)
    quantization: Quantization = field(default_factory=Quantization)
    resolution: Resolution = field(default_factory=Resolution)

    def tolerance(self, artifact: str) -> Tolerance:
        """The parity tolerance that judges `artifact` (e.g. `ort_int8` -> the int8 table)."""
        return self.parity[ARTIFACTS[artifact]]

    @property
    def needs_int8(self) -> bool:
        return any(ARTIFACTS[a] == "int8" for a in self.artifacts)

    @property
    def max_accuracy_drop_pt(self) -> float:
        return self.budget.max_accuracy_drop_pt

    def as_dict(self) -> dict[str, Any]:
        """JSON-able content (no path): for manifests and stage fingerprints."""
        payload = asdict(self)
        payload.pop("path")
        return payload

    def summary(self) -> str:
        budget = (
            f"{self.budget.latency_ms:g} ms p50 @ batch {self.budget.latency_batch}"
            if self.budget.latency_ms
            else "no latency budget"
        )
        providers = "+".join(p.removesuffix("ExecutionProvider") for p in self.runtime.providers)
        batches = ",".join(str(b) for b in self.bench.batch_sizes)
        return (
            f"{self.name}: {', '.join(self.artifacts)} | {providers}, {self.runtime.threads} threads, "
            f"batch {batches} | {budget}, max drop {self.budget.max_accuracy_drop_pt:g} pt | {self.description}"
        )


# --- validation ------------------------------------------------------------------------------------

Check = Callable[[Any], Any]


class _Invalid(Exception):
    def __init__(self, allowed: str) -> None:
        self.allowed = allowed


def _number(low: float | None = None, high: float | None = None, integer: bool = False) -> Check:
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f">= {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    allowed = kind + (" " + " and ".join(bounds) if bounds else "")

    def check(value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            raise _Invalid(allowed)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _Invalid(allowed)
        return value if integer else float(value)

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _choice(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise _Invalid("one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def _list(item: Check, what: str, unique: bool = True) -> Check:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list) or not value:
            raise _Invalid(f"a non-empty list of {what}")
        try:
            items = tuple(item(v) for v in value)
        except _Invalid as exc:
            raise _Invalid(f"a non-empty list of {what} ({exc.allowed})") from None
        if unique and len(set(items)) != len(items):
            raise _Invalid(f"a non-empty list of distinct {what}")
        return items

    return check


_SCHEMA: dict[str, dict[str, Check]] = {
    "runtime": {
        "providers": _list(_choice(PROVIDERS), "execution providers"),
        "threads": _number(1, 256, integer=True),
    },
    "bench": {
        "batch_sizes": _list(_number(1, 4096, integer=True), "batch sizes"),
        "warmup": _number(0, 100_000, integer=True),
        "runs": _number(1, 1_000_000, integer=True),
        "min_time_s": _number(0, 3600),
    },
    "budget": {
        "latency_ms": _number(0.001, 1e6),
        "latency_batch": _number(1, 4096, integer=True),
        "max_accuracy_drop_pt": _number(0, 100),
    },
    "quantization": {
        "method": _choice(METHODS),
        "percentile": _number(90, 100),
        "per_channel": _boolean,
        "activation_type": _choice(QUANT_TYPES),
        "weight_type": _choice(QUANT_TYPES),
        "reduce_range": _boolean,
        "input_format": _choice(INPUT_FORMATS),
        "bias_correction": _boolean,
        "fallback_methods": _list(_choice(METHODS), "calibration methods"),
    },
    "resolution": {
        "size": _number(32, 1024, integer=True),
        "candidates": _list(_number(32, 1024, integer=True), "input sizes"),
        "max_accuracy_drop_pt": _number(0, 100),
    },
}
_TOLERANCE_KEYS: dict[str, Check] = {
    "max_abs": _number(0, 1e6),
    "min_cosine": _number(-1, 1),
    "top1_agreement": _number(0, 1),
}
_TOP_LEVEL = ("description", "artifacts", "parity", *_SCHEMA)


def _table(source: Path, name: str, raw: Any, schema: dict[str, Check]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise EdgeBuildError(f"{source}: '{name}' must be a table [{name}]", f"allowed keys: {', '.join(schema)}")
    values = {}
    for key, value in raw.items():
        if key not in schema:
            raise EdgeBuildError(
                f"{source}: unknown key '{name}.{key}'", f"allowed keys in [{name}]: {', '.join(schema)}"
            )
        values[key] = _value(source, f"{name}.{key}", value, schema[key])
    return values


def _value(source: Path, key: str, value: Any, check: Check) -> Any:
    try:
        return check(value)
    except _Invalid as exc:
        raise EdgeBuildError(f"{source}: {key} = {value!r} is not allowed", f"allowed: {exc.allowed}") from None


def _parity(source: Path, raw: Any) -> dict[str, Tolerance]:
    parity = dict(DEFAULT_PARITY)
    if raw is None:
        return parity
    if not isinstance(raw, dict):
        raise EdgeBuildError(f"{source}: 'parity' must be a table", f"use [parity.<kind>] with kind in {PRECISIONS}")
    for kind, table in raw.items():
        if kind not in PRECISIONS:
            raise EdgeBuildError(f"{source}: unknown key 'parity.{kind}'", f"allowed kinds: {', '.join(PRECISIONS)}")
        values = _table(source, f"parity.{kind}", table, _TOLERANCE_KEYS)
        if "max_abs" not in values and "min_cosine" not in values:
            raise EdgeBuildError(
                f"{source}: [parity.{kind}] sets neither max_abs nor min_cosine", "set at least one of them"
            )
        parity[kind] = Tolerance(**values)
    return parity


#: A profile's name becomes directory names (dist/<name>, build/quantize-<name>): no dots, slashes or spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def parse_target(source: Path, data: dict[str, Any]) -> TargetProfile:
    """Validate a profile's parsed TOML; `source` names the file in every error."""
    if not _NAME.fullmatch(source.stem):
        raise EdgeBuildError(
            f"{source}: '{source.stem}' cannot be a target name (it names directories: dist/<name>)",
            "rename the file to letters, digits, '-' or '_' followed by .toml",
        )
    for key in data:
        if key not in _TOP_LEVEL:
            raise EdgeBuildError(f"{source}: unknown key '{key}'", f"allowed top-level keys: {', '.join(_TOP_LEVEL)}")
    for key in ("description", "artifacts"):
        if key not in data:
            raise EdgeBuildError(
                f"{source}: missing key '{key}'", "every target profile sets description and artifacts"
            )
    description = _value(source, "description", data["description"], _text)
    artifacts = _value(source, "artifacts", data["artifacts"], _list(_choice(tuple(ARTIFACTS)), "artifact names"))
    sections = {name: _table(source, name, data.get(name, {}), schema) for name, schema in _SCHEMA.items()}
    if "candidates" in sections["resolution"] and "size" not in sections["resolution"]:
        sections["resolution"]["size"] = sections["resolution"]["candidates"][0]
    resolution = Resolution(**sections["resolution"])
    if resolution.size not in resolution.candidates:
        if "candidates" in sections["resolution"]:
            raise EdgeBuildError(
                f"{source}: resolution.size = {resolution.size} is not among resolution.candidates",
                f"allowed: one of {list(resolution.candidates)}",
            )
        resolution = replace(resolution, candidates=(resolution.size,))
    odd = [size for size in (resolution.size, *resolution.candidates) if size % 32]
    if odd:
        # Five stride-2 stages: other sizes reach an odd feature map, where TF SAME padding shifts side.
        raise EdgeBuildError(
            f"{source}: resolution size {odd[0]} is not a multiple of 32",
            "MobileNetV2 halves the image five times; use 96, 128, 160, 192, 224, 256, ...",
        )
    quantization = Quantization(**sections["quantization"])
    if quantization.input_format == "uint8_nhwc" and quantization.activation_type != "uint8":
        raise EdgeBuildError(
            f"{source}: quantization.input_format = 'uint8_nhwc' needs quantization.activation_type = 'uint8'",
            "raw uint8 pixels are the first layer's quantized input only with uint8 activations",
        )
    return TargetProfile(
        name=source.stem,
        path=source,
        description=description,
        artifacts=artifacts,
        runtime=Runtime(**sections["runtime"]),
        bench=Bench(**sections["bench"]),
        parity=_parity(source, data.get("parity")),
        budget=Budget(**sections["budget"]),
        quantization=quantization,
        resolution=resolution,
    )


def read_target_file(path: Path) -> TargetProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeBuildError(f"cannot read target profile {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeBuildError(f"{path} is not valid TOML: {exc}", "fix the syntax") from exc
    except RecursionError:  # tomllib recurses per nesting level: `x = [[[[...` a few hundred deep
        raise EdgeBuildError(f"{path}: nested too deeply to be a settings file", "fix the file") from None
    return parse_target(path, data)


def target_names(targets_dir: Path) -> list[str]:
    targets_dir = Path(targets_dir)
    if not targets_dir.is_dir():
        raise EdgeBuildError(
            f"target profile directory not found: {targets_dir}", "pass --targets or set EDGE_BUILD_TARGETS"
        )
    return sorted(path.stem for path in targets_dir.glob("*.toml"))


def load_target(name_or_path: str | Path, targets_dir: Path) -> TargetProfile:
    """A profile by name (`targets_dir/<name>.toml`) or by the path of a `.toml` file."""
    text = str(name_or_path)
    candidate = Path(text)
    if text.endswith(".toml") or candidate.is_file():
        if not candidate.is_file():
            raise EdgeBuildError(f"target profile not found: {candidate}", "pass a target name or an existing .toml")
        return read_target_file(candidate)
    path = Path(targets_dir) / f"{text}.toml"
    if not path.is_file():
        names = target_names(targets_dir)
        raise EdgeBuildError(
            f"no target profile '{text}' in {targets_dir}",
            f"available: {', '.join(names) or 'none'}; or add {path.name} there",
        )
    return read_target_file(path)


def list_targets(targets_dir: Path) -> list[TargetProfile]:
    """Every profile in `targets_dir`, validated (the first invalid file raises)."""
    return [read_target_file(Path(targets_dir) / f"{name}.toml") for name in target_names(targets_dir)]
