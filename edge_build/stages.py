"""Stage caching: the one place that decides whether a stage must run again.

A stage describes what it reads (`inputs`: content hashes, settings) and writes its
outputs into its own directory. Its record (`record.json`) stores the inputs'
fingerprint and the sha256 of every output. A stage is skipped only when the
fingerprint matches and every output still has its recorded hash: a changed input
always reruns it, a corrupted or missing output always rebuilds it. The record seals
itself (`digest`: the hash of the rest of it), so a damaged record is never trusted.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_build import atomic
from edge_build.hashing import fingerprint, sha256_file

RECORD_NAME = "record.json"
SCHEMA = 1

#: Names of the stages that actually ran in this process, in order (tests count these).
EXECUTIONS: list[str] = []


@dataclass
class StageResult:
    name: str
    directory: Path
    ran: bool
    info: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.directory / name


def _sealed(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as it reads back from JSON, plus the digest `_load_record` checks."""
    import json

    plain = json.loads(json.dumps(record, default=atomic.json_default))
    return {**plain, "digest": fingerprint(plain)}


def _load_record(directory: Path) -> dict[str, Any] | None:
    import json

    try:
        record = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return None
    digest = record.pop("digest", None)
    return record if digest == fingerprint(record) else None


def is_fresh(directory: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record when `directory` holds intact outputs of exactly these inputs."""
    record = _load_record(directory)
    if record is None or record.get("fingerprint") != fingerprint(inputs):
        return None
    for name, digest in record.get("outputs", {}).items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return record


def run_stage(
    name: str,
    directory: Path,
    inputs: dict[str, Any],
    produce: Callable[[Path], dict[str, Any] | None],
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> StageResult:
    """Run `produce(directory)` unless `directory` already holds its outputs for `inputs`.

    `produce` writes its files into the directory (through `edge_build.atomic`) and
    returns JSON-able info kept in the record (metrics, chosen settings...).
    Every regular file in the directory except the record counts as an output.
    """
    directory = Path(directory)
    if not force:
        record = is_fresh(directory, inputs)
        if record is not None:
            if log:
                log(f"{name}: up to date, skipped")
            return StageResult(name, directory, ran=False, info=record.get("info") or {})
    # A stale record must not survive a failed rerun: remove it before producing.
    (directory / RECORD_NAME).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.rglob(".*.tmp"):  # a killed writer's; commands hold the build lock while they run stages
        leftover.unlink(missing_ok=True)
    EXECUTIONS.append(name)
    info = produce(directory) or {}
    outputs = {
        str(path.relative_to(directory)): sha256_file(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != RECORD_NAME and not path.name.startswith(".")
    }
    record = {
        "schema": SCHEMA,
        "stage": name,
        "fingerprint": fingerprint(inputs),
        "inputs": inputs,
        "outputs": outputs,
        "info": info,
    }
    atomic.write_json(directory / RECORD_NAME, _sealed(record))
    return StageResult(name, directory, ran=True, info=info)


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
