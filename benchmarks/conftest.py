"""pytest-benchmark suite: batch-1 and batch-N inference of a target's artifacts per runtime.

Run with `nox -s bench` or `pytest benchmarks/ --benchmark-autosave`, compare saved runs with
`pytest benchmarks/ --benchmark-compare`. It benchmarks what `edge-build all --target NAME`
built (`EDGE_BUILD_BENCH_TARGET`, default `lite`) plus the LiteRT and MindSpore reference rows;
subjects that are not built are skipped with the reason. Not part of the default test run
(pyproject's testpaths is tests/), and enabled here although addopts disables pytest-benchmark
for the unit tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_build.bench import LITERT_REFERENCE
from edge_build.config import load_settings
from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing
from edge_build.runners import UINT8_NHWC

TARGET_ENV = "EDGE_BUILD_BENCH_TARGET"


def pytest_configure(config: pytest.Config) -> None:
    # pyproject's addopts carries --benchmark-disable for the unit tests; this suite exists to measure.
    if "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str  # "artifact" | "litert" | "mindspore"
    path: Path | None
    skip: str | None = None


@dataclass(frozen=True)
class Context:
    target: Any
    build_dir: Path
    data_root: Path
    subjects: tuple[Subject, ...]
    batch_sizes: tuple[int, ...]


def _context() -> Context:
    from edge_build.targets import load_target

    settings = load_settings()
    target = load_target(os.environ.get(TARGET_ENV, "lite"), settings["targets"].path)
    build_dir = settings.build_dir
    try:
        from edge_build.export import find_artifacts

        built = find_artifacts(build_dir)
    except EdgeBuildError:
        built = {}
    subjects = [
        Subject(name, "artifact", built.get(name), None if name in built else f"not built in {build_dir}")
        for name in target.artifacts
    ]
    litert = settings.weights.path.parent / LITERT_REFERENCE
    subjects.append(Subject("litert", "litert", litert, None if litert.is_file() else f"{litert} not found"))
    subjects.append(Subject("mindspore", "mindspore", None))
    batches = (1, max(target.bench.batch_sizes)) if max(target.bench.batch_sizes) > 1 else (1,)
    return Context(target, build_dir, settings.data.path, tuple(subjects), batches)


CONTEXT = _context()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "subject" in metafunc.fixturenames:
        params = [
            pytest.param(s, id=s.name, marks=[pytest.mark.skip(reason=s.skip)] if s.skip else [])
            for s in CONTEXT.subjects
        ]
        metafunc.parametrize("subject", params, scope="session")
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", CONTEXT.batch_sizes, ids=[f"b{b}" for b in CONTEXT.batch_sizes])


@pytest.fixture(scope="session")
def threads() -> int:
    return CONTEXT.target.runtime.threads


@pytest.fixture(scope="session")
def runner(subject: Subject, threads: int) -> Any:
    """The subject loaded once in its runtime, with the target's threads."""
    from edge_build.bench_child import LiteRTRunner, mindspore_reference
    from edge_build.runners import open_runner

    if subject.kind == "litert":
        return LiteRTRunner(subject.path, threads)
    if subject.kind == "mindspore":
        try:
            return mindspore_reference(str(CONTEXT.build_dir), threads)
        except (EdgeBuildError, ModuleNotFoundError) as exc:
            pytest.skip(f"no trained network: {exc}")
    if CONTEXT.target.runtime.wants_cuda:
        pytest.skip("GPU target: GPU latency is measured by `edge-build bench` on a machine with CUDA")
    return open_runner(subject.path, threads=threads, providers=tuple(CONTEXT.target.runtime.providers))


@pytest.fixture(scope="session")
def val_rgb() -> np.ndarray:
    """Up to 64 validation images as 224x224 uint8 RGB (real inputs, not noise)."""
    from edge_build.dataset import list_split
    from edge_build.images import load_rgb

    try:
        refs = list_split(CONTEXT.data_root, "val")[::2][:64]
    except EdgeBuildError as exc:
        pytest.skip(str(exc))
    pre = Preprocessing()
    return np.stack([pre.resize_rgb(load_rgb(ref.path)) for ref in refs])


@pytest.fixture
def inputs(runner: Any, val_rgb: np.ndarray, batch: int) -> np.ndarray:
    rgb = val_rgb[np.arange(batch) % len(val_rgb)]
    return np.ascontiguousarray(rgb) if runner.input_format == UINT8_NHWC else Preprocessing().normalize(rgb)
