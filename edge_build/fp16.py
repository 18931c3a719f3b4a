"""Stage `fp16`: the fp32 ONNX with float16 weights and arithmetic (the gpu target's model).

Converted with ONNX Runtime's copy of onnxconverter-common's float16 pass
(`onnxruntime.transformers.float16`), inputs and outputs kept float32 so the model
takes the same batch as the fp32 one. It runs under the CUDA execution provider; on a
machine without a GPU it still loads and runs on the CPU, which is how it is checked
and verified there (its latency on the CPU means nothing for a GPU and is not reported
as a GPU number).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.stages import run_stage

FP16_ONNX = "model_fp16.onnx"
SCHEMA = 1


def convert_to_fp16(fp32_onnx: Path, out_path: Path) -> Path:
    """Write the float16 version of `fp32_onnx` to `out_path` (atomically), checked to load and run."""
    import logging

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edge_build.onnx_graph import read_metadata, set_metadata
    from edge_build.runners import OnnxRunner

    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise EdgeBuildError(f"fp32 ONNX model not found: {fp32_onnx}", "run `edge-build export` first")
    model = onnx.load(str(fp32_onnx))
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    half = convert_float_to_float16(model, keep_io_types=True)
    _sort_topologically(half.graph)  # the pass appends its input casts after their consumers
    metadata = read_metadata(model)
    metadata["edge_build.precision"] = "fp16"
    set_metadata(half, metadata)
    try:
        onnx.checker.check_model(half, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise EdgeBuildError(
            f"{fp32_onnx}: the float16 conversion is invalid ({str(exc).splitlines()[0][:200]})"
        ) from exc
    with atomic.atomic_path(out_path) as tmp:
        onnx.save(half, str(tmp))
    runner = OnnxRunner(out_path, threads=1)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    sample = np.zeros(shape, dtype=np.uint8 if runner.input_format == "uint8_nhwc" else np.float32)
    if not np.all(np.isfinite(runner.run(sample))):
        raise EdgeBuildError(f"{out_path}: the float16 model produces non-finite outputs", "check the fp32 model")
    return out_path


def _sort_topologically(graph: Any) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise EdgeBuildError("the float16 graph has a cycle or a missing input", "this is an edge-build bug")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def fp16_stage(fp32_onnx: Path, out_dir: Path, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Cached fp16 conversion into `out_dir` (publishes `onnx_fp16` in its artifacts.json)."""
    from edge_build.export import ARTIFACTS_FILE, ARTIFACTS_SCHEMA
    from edge_build.runners import OnnxRunner

    out_dir = Path(out_dir)
    inputs = {"schema": SCHEMA, "fp32_onnx": sha256_file(fp32_onnx)}

    def produce(directory: Path) -> dict[str, Any]:
        path = convert_to_fp16(fp32_onnx, directory / FP16_ONNX)
        runner = OnnxRunner(path, threads=1)
        entry = {"file": path.name, "input_format": runner.input_format, "outputs": runner.output_names}
        atomic.write_json(directory / ARTIFACTS_FILE, {"schema": ARTIFACTS_SCHEMA, "artifacts": {"onnx_fp16": entry}})
        return {"bytes": path.stat().st_size}

    run_stage("fp16", out_dir, inputs, produce, force=force, log=log)
    return out_dir / FP16_ONNX
