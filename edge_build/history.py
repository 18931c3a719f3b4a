"""Benchmark history: one JSON-lines file per machine, and regression detection.

Latency is only comparable on the same hardware and software, so records are kept per
machine id (CPU model, core count, OS, runtime versions) in
`benchmarks/history/<machine-id>.jsonl`, and a run is compared with the previous
record of the same machine id and target.

Regression rule: an artifact's p50 at a batch size regressed when
`p50_now > p50_before * machine * (1 + PCT/100) + spread_now + spread_before`.
A run's spread is half the range of its per-round medians (rounds are interleaved
across subjects, so this is how much the p50 of the same run moved by itself).
`machine` (>= 1) is how much slower an unchanged yardstick got between the two runs:
a reference row whose file has the same sha256 in both records (Google's LiteRT
model), measured interleaved with the artifacts. On a shared machine whose load
changes between runs, everything slows down together; that is the machine, not the
artifact. A slowdown within the run's own wobble or the machine's drift is never
called a regression; the factor never makes the rule stricter.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from edge_build import atomic
from edge_build.errors import EdgeBuildError
from edge_build.hashing import fingerprint

SCHEMA = 1
_RUNTIMES = ("onnxruntime", "onnxruntime-gpu", "mindspore", "ai-edge-litert", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine() -> dict[str, Any]:
    """What makes latency figures comparable: hardware, OS and runtime versions."""
    versions = {}
    for name in _RUNTIMES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "runtimes": versions,
    }


def machine_id(description: dict[str, Any] | None = None) -> str:
    """A readable, file-name-safe id: `<cpu>-<cores>c-<os>-<hash of the whole description>`."""
    description = description or machine()
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", description["cpu"], flags=re.IGNORECASE)
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:40] or "cpu"
    system = re.sub(r"[^a-z0-9]+", "-", description["os"].split()[0].lower())
    return f"{cpu}-{description['cores']}c-{system}-{fingerprint(description)[:10]}"


def history_file(history_dir: Path, machine_key: str) -> Path:
    return Path(history_dir) / f"{machine_key}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a history file; a corrupt line is an error naming the file and line."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EdgeBuildError(
                f"{path}:{number}: not a JSON record ({exc})", "fix or delete that line; every line is one run"
            ) from exc
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            records.append(record)
    return records


def previous_record(history_dir: Path, machine_key: str, target: str) -> dict[str, Any] | None:
    """The latest record of `target` on this machine, or None."""
    matches = [r for r in read_records(history_file(history_dir, machine_key)) if r.get("target") == target]
    return matches[-1] if matches else None


def append_record(history_dir: Path, record: dict[str, Any]) -> Path:
    """Append one record (one line) to its machine's history, under a lock, atomically."""
    path = history_file(history_dir, record["machine_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(f".{path.name}.lock"))):
        existing = path.read_text(encoding="utf-8") if path.is_file() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        atomic.write_text(path, existing + json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def new_record(
    target: str, git_commit: str, artifacts: dict[str, dict[str, Any]], latency: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A history record. `latency`: artifact name -> batch size (str) -> {p50_ms, spread_ms, ...}."""
    description = machine()
    return {
        "schema": SCHEMA,
        "machine_id": machine_id(description),
        "machine": description,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit,
        "target": target,
        "artifacts": artifacts,
        "latency": latency,
    }


@dataclass(frozen=True)
class Change:
    artifact: str
    batch: int
    before_ms: float
    now_ms: float
    noise_ms: float
    #: now/before p50 of the unchanged reference rows (1.0 when there is none).
    machine: float = 1.0
    role: str = "artifact"

    @property
    def change_pct(self) -> float:
        return (self.now_ms / self.before_ms - 1.0) * 100.0 if self.before_ms > 0 else 0.0

    def regressed(self, pct: float) -> bool:
        """An artifact slower by more than `pct` %, beyond both runs' spread and the machine's drift."""
        allowed = self.before_ms * max(1.0, self.machine) * (1.0 + pct / 100.0) + self.noise_ms
        return self.role == "artifact" and self.now_ms > allowed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "change_pct": round(self.change_pct, 2)}


def _yardsticks(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Reference rows with the very same file in both records: their change is the machine's."""
    names = []
    for name, entry in current.get("artifacts", {}).items():
        before = previous.get("artifacts", {}).get(name, {})
        if entry.get("role") == "reference" and entry.get("sha256") and entry.get("sha256") == before.get("sha256"):
            names.append(name)
    return names


def machine_drift(previous: dict[str, Any], current: dict[str, Any], batch: str) -> float:
    """Median now/before p50 ratio of the yardsticks at `batch` (1.0 when there is none)."""
    ratios = []
    for name in _yardsticks(previous, current):
        before = previous.get("latency", {}).get(name, {}).get(batch)
        now = current.get("latency", {}).get(name, {}).get(batch)
        if before and now and float(before["p50_ms"]) > 0:
            ratios.append(float(now["p50_ms"]) / float(before["p50_ms"]))
    return float(statistics.median(ratios)) if ratios else 1.0


def compare(previous: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Per subject and batch size present in both records: p50 before/now, spread and machine drift."""
    changes = []
    for name, by_batch in current.get("latency", {}).items():
        before_rows = previous.get("latency", {}).get(name, {})
        role = current.get("artifacts", {}).get(name, {}).get("role", "artifact")
        for batch, now in by_batch.items():
            before = before_rows.get(batch)
            if not before:
                continue
            noise = float(now.get("spread_ms", 0.0)) + float(before.get("spread_ms", 0.0))
            changes.append(
                Change(
                    name,
                    int(batch),
                    float(before["p50_ms"]),
                    float(now["p50_ms"]),
                    noise,
                    machine_drift(previous, current, batch),
                    role,
                )
            )
    return changes


def regressions(changes: list[Change], pct: float) -> list[Change]:
    return [change for change in changes if change.regressed(pct)]
