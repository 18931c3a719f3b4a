"""Deployable bundles: a directory plus `manifest.json` naming every file's size and sha256.

A bundle is assembled in a staging directory and swapped in whole at the end, so a
failed build leaves the previous good bundle untouched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from edge_build import atomic
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.hashing import file_entry
from edge_build.provenance import provenance

MANIFEST = "manifest.json"
SCHEMA = 1
#: Written into the bundle after the manifest (they render it), so never listed in it.
REPORT_FILES = frozenset({"report.html", "report.md"})


def _unlisted_by_design(relative: str) -> bool:
    """The report files, and the temp file of a report write that a `kill -9` interrupted (`.report.html.*.tmp`)."""
    temporary = relative.startswith(".") and relative.endswith(".tmp") and "/" not in relative
    return relative in REPORT_FILES or (temporary and any(relative.startswith(f".{r}.") for r in REPORT_FILES))


@contextlib.contextmanager
def publish_lock(target_dir: Path) -> Iterator[None]:
    """Serialize bundle assembly into one output directory across builds.

    Two builds with different build directories may publish to the same `--out`; they
    share the staging directory, so the second waits (seconds: copy and hash) instead
    of wiping the first one's half-assembled bundle.
    """
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir.with_name(f".publish-{target_dir.name}.lock"))):
        yield


def staging_dir(target_dir: Path) -> Path:
    """A fresh sibling directory to assemble a bundle in (call it under `publish_lock`)."""
    staging = target_dir.with_name(f".{target_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def copy_into(staging: Path, source: Path, name: str | None = None) -> Path:
    destination = staging / (name or source.name)
    with atomic.atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return destination


def write_manifest(staging: Path, details: dict[str, Any]) -> Path:
    """Hash every file in `staging` and write the manifest (details: target, metrics, hashes...)."""
    files = [
        {"path": str(path.relative_to(staging)), **file_entry(path)}
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.name != MANIFEST and not _unlisted_by_design(path.relative_to(staging).as_posix())
    ]
    manifest = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance(),
        **details,
        "files": files,
    }
    return atomic.write_json(staging / MANIFEST, manifest)


def publish(staging: Path, target_dir: Path) -> Path:
    atomic.replace_directory(staging, target_dir)
    return target_dir


@dataclass
class BundleCheck:
    directory: Path
    checked: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_bundle(directory: Path) -> BundleCheck:
    """Re-hash every file against the manifest: changed, missing and unlisted files are problems."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise EdgeBuildError(f"{directory} has no {MANIFEST}", "point at a bundle built by `edge-build all`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {entry["path"]: entry for entry in manifest["files"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(f"{manifest_path} is corrupt ({exc})", "rebuild the bundle with `edge-build all`") from exc
    problems = []
    for relative, entry in listed.items():
        path = directory / relative
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            problems.append(f"{relative}: names a path outside the bundle")
            continue
        if not path.is_file():
            problems.append(f"{relative}: missing")
            continue
        actual = file_entry(path)
        if actual["sha256"] != entry["sha256"]:
            problems.append(f"{relative}: content changed (sha256 {actual['sha256'][:12]} != {entry['sha256'][:12]})")
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_file() and path.name != MANIFEST and relative not in listed and not _unlisted_by_design(relative):
            problems.append(f"{relative}: not listed in the manifest")
    return BundleCheck(directory, len(listed), problems)
