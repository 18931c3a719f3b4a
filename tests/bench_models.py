"""Small real ONNX models for the benchmark tests (built with onnx.helper, no export needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def convnet(path: Path, width: int = 8, depth: int = 1, size: int = 224, classes: int = 26, seed: int = 0) -> Path:
    """float NCHW [N,3,size,size] -> stride-2 3x3 conv + ReLU, `depth` more 3x3 convs, GAP, Gemm -> logits.

    `width` and `depth` scale the work, so a heavier model is a genuinely slower artifact.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name: str, source: str, cin: int, cout: int, stride: int) -> str:
        weight = rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}_w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}_b"))
        nodes.append(
            helper.make_node(
                "Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[1, 1, 1, 1], strides=[stride] * 2
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]))
        return f"{name}_r"

    x = conv("stem", "input", 3, width, 2)
    for index in range(depth):
        x = conv(f"block{index}", x, width, width, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    inits.append(numpy_helper.from_array(rng.normal(0, 1, (classes, width)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "bench_convnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class SleepRunner:
    """A fake runtime whose every call takes `ms` milliseconds (a planted, known latency)."""

    input_format = "uint8_nhwc"
    input_shape = (8, 8, 3)

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.name = f"sleep{ms:g}"

    def run(self, batch: np.ndarray) -> np.ndarray:
        import time

        time.sleep(self.ms / 1000.0)
        return np.zeros((len(batch), 26), np.float32)


def sleep_runner(ms: float) -> SleepRunner:
    return SleepRunner(ms)
