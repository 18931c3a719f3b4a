"""Runtimes behind one small interface: load an artifact, run a batch, return outputs.

Parity (`verify`), accuracy gates and benchmarks are written once against `Runner`.
A runner takes a batch in the layout its artifact declares (`input_format`):
"float_nchw" (preprocessed float32 N,3,H,W) or "uint8_nhwc" (raw RGB images with the
preprocessing inside the graph), and returns the first output (logits) as float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_build.errors import EdgeBuildError

FLOAT_NCHW = "float_nchw"
UINT8_NHWC = "uint8_nhwc"


class Runner(Protocol):
    name: str
    input_format: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass
class OnnxRunner:
    """ONNX Runtime on an `.onnx` or `.ort` file (CPU, or CUDA when asked and present)."""

    path: Path
    threads: int = 2
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    spinning: bool = True
    name: str = ""
    input_format: str = FLOAT_NCHW
    session: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.path = Path(self.path)
        if not self.path.is_file():
            raise EdgeBuildError(f"model file not found: {self.path}", "run `edge-build export` first")
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise EdgeBuildError(
                f"{self.path.name}: execution provider {missing[0]} is not available here",
                f"available: {', '.join(ort.get_available_providers())}",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(self.providers))
        except Exception as exc:  # ORT raises its own exception types for every load failure
            raise EdgeBuildError(
                f"{self.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})",
                "the file is truncated or not a model; rebuild it with `edge-build export`",
            ) from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_format = UINT8_NHWC if inp.type == "tensor(uint8)" else FLOAT_NCHW
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = self.name or self.path.name

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: batch})
        return dict(zip(self.output_names, outputs, strict=True))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(self.output_names[:1], {self.input_name: batch})[0], dtype=np.float32)


@dataclass
class MindSporeRunner:
    """A MindSpore `nn.Cell` on the CPU, in eval mode: PyNative, and for an inference-only
    MobileNetV2 cell (`network.fold_batchnorm`) a compiled graph once a batch shape repeats
    (`network.inference_forward`)."""

    cell: Any
    name: str = "mindspore"
    input_format: str = FLOAT_NCHW
    forward: Any = field(default=None, init=False, repr=False)

    def run(self, batch: np.ndarray) -> np.ndarray:
        from edge_build.msenv import mindspore_module
        from edge_build.network import inference_forward

        ms = mindspore_module()
        if self.forward is None:
            self.forward = inference_forward(self.cell)
        out = self.forward(ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.asnumpy().astype(np.float32)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.run(batch)}


@dataclass
class MindIRRunner:
    """A `.mindir` file loaded with `mindspore.load` and run through `nn.GraphCell`."""

    path: Path
    name: str = ""
    input_format: str = FLOAT_NCHW
    batch_size: int | None = None

    def __post_init__(self) -> None:
        from edge_build.msenv import mindspore_module

        ms = mindspore_module()
        self.path = Path(self.path)
        if not self.path.is_file():
            raise EdgeBuildError(f"model file not found: {self.path}", "run `edge-build export` first")
        try:
            graph = ms.load(str(self.path))
        except Exception as exc:  # MindSpore raises RuntimeError/ValueError variants
            raise EdgeBuildError(
                f"{self.path}: MindSpore cannot load it ({str(exc).splitlines()[0][:200]})",
                "the file is truncated or not a MindIR; rebuild it with `edge-build export`",
            ) from exc
        self.cell = ms.nn.GraphCell(graph)
        self.name = self.name or self.path.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        from edge_build.msenv import mindspore_module

        ms = mindspore_module()
        if self.batch_size and batch.shape[0] != self.batch_size:
            # MindIR graphs are exported with a static batch: run in fixed chunks, pad the tail.
            chunks = []
            for start in range(0, batch.shape[0], self.batch_size):
                part = batch[start : start + self.batch_size]
                pad = self.batch_size - part.shape[0]
                if pad:
                    part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
                out = self.cell(ms.Tensor(np.ascontiguousarray(part, dtype=np.float32)))
                out = out[0] if isinstance(out, (tuple, list)) else out
                chunks.append(out.asnumpy()[: self.batch_size - pad])
            return np.concatenate(chunks).astype(np.float32)
        out = self.cell(ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.asnumpy().astype(np.float32)

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.run(batch)}


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run `inputs` through `runner` in batches and concatenate the outputs."""
    return np.concatenate([runner.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def open_runner(
    path: str | os.PathLike[str],
    threads: int = 2,
    providers: tuple[str, ...] | None = None,
    spinning: bool = True,
) -> Runner:
    """A runner for an artifact file, chosen by its extension.

    `spinning=False` stops ONNX Runtime's idle threads from busy-waiting: slower per call
    in a latency benchmark, cheaper for bulk work on a shared CPU (parity, accuracy).
    """
    path = Path(path)
    if path.suffix in (".onnx", ".ort"):
        return OnnxRunner(path, threads=threads, providers=providers or ("CPUExecutionProvider",), spinning=spinning)
    if path.suffix == ".mindir":
        return MindIRRunner(path)
    raise EdgeBuildError(f"{path}: no runtime for '{path.suffix}' files", "expected .onnx, .ort or .mindir")
