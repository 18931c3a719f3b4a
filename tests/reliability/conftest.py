"""The reliability suite's shared fixture: one uninterrupted cold build to compare every fault with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import DATA, WEIGHTS, Reference, build_all, metrics


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
    if not DATA.is_dir() or not WEIGHTS.is_file():
        pytest.skip("shared data set or weights not present")
    reuse = os.environ.get("RELIABILITY_REFERENCE")
    if reuse:  # while working on one test: the root of an earlier uninterrupted build (build/ and dist/)
        root = Path(reuse)
        return Reference(root, root / "build", root / "dist", None, metrics(root / "dist", root / "build"))
    root = tmp_path_factory.mktemp("reference")
    build, dist = root / "build", root / "dist"
    run = build_all(build, dist)
    assert run.returncode == 0, str(run)
    return Reference(root, build, dist, run, metrics(dist, build))
