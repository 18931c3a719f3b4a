"""Where an artifact came from: tool and library versions, git commit, machine."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from edge_build import __version__

_LIBRARIES = ("mindspore", "onnx", "onnxruntime", "numpy", "pillow", "click")


@functools.cache
def git_commit() -> str:
    """The commit of the edge-build checkout (with `-dirty` when it has changes), or `unknown`."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "edge-build": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance() -> dict[str, object]:
    return {"edge_build_version": __version__, "git_commit": git_commit(), "versions": library_versions()}
