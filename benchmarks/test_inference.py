"""Batch-1 and batch-N inference per artifact and reference runtime (pytest-benchmark)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def test_inference(benchmark: Any, subject: Any, runner: Any, inputs: np.ndarray, batch: int, threads: int) -> None:
    benchmark.group = f"batch {batch}"
    benchmark.extra_info.update({"subject": subject.name, "batch": batch, "threads": threads})
    if subject.path is not None:
        from edge_build.hashing import sha256_file

        benchmark.extra_info["sha256"] = sha256_file(subject.path)
    # A runtime that compiles a shape after N images (MindSpore) is timed compiled, as in `edge-build bench`.
    for _ in range(math.ceil(getattr(runner, "warmup_images", 0) / batch) + 1):
        runner.run(inputs)
    outputs = benchmark(runner.run, inputs)
    assert outputs.shape[0] == batch and np.isfinite(outputs).all()
