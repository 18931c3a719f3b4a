"""Read a TFLite flatbuffer with the maintained `tflite` schema package and dequantize its weights.

This module knows TFLite, not MobileNetV2: it turns the file into a list of weight layers
(conv, depthwise conv, fully connected) in graph order, each with float32 weights in TFLite's
own layout, the dequantized bias, stride, padding (including an explicit PAD op that feeds
it) and fused activation. `edge_build.weights` maps those layers onto the network.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.errors import EdgeBuildError

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")

_HINT = "use an unmodified MobileNetV2 1.0 224 .tflite file (see ../shared/weights/SOURCE.md)"


def _enum_names(enum_class: type) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


@dataclass(frozen=True)
class Quantization:
    scale: np.ndarray  # float32, one value (per tensor) or one per channel
    zero_point: np.ndarray  # int64, same length as scale
    axis: int

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def as_dict(self) -> dict[str, Any]:
        if self.per_channel:
            return {"per_channel": True, "axis": self.axis, "channels": int(self.scale.size)}
        return {"per_channel": False, "scale": float(self.scale[0]), "zero_point": int(self.zero_point[0])}


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str  # TFLite type name: "UINT8", "INT8", "INT32", "FLOAT32"...
    shape: tuple[int, ...]
    quantization: Quantization | None
    buffer: int


@dataclass
class WeightLayer:
    """One CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op with float32 weights (TFLite layout)."""

    op_index: int
    op: str
    weight_tensor: TensorInfo
    weight: np.ndarray  # CONV_2D: (O,kh,kw,I); DEPTHWISE_CONV_2D: (1,kh,kw,C); FULLY_CONNECTED: (O,I)
    bias: np.ndarray | None  # (O,) float32
    stride: int = 1
    padding: str = "VALID"  # TFLite padding of the op itself: "SAME" or "VALID"
    explicit_pad: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) from a PAD op feeding it
    activation: str = "NONE"  # "NONE", "RELU", "RELU6"...

    @property
    def quantization(self) -> dict[str, Any]:
        q = self.weight_tensor.quantization
        kind = self.weight_tensor.dtype.lower()
        if q is None:
            return {"dtype": kind}
        return {"dtype": kind, **q.as_dict()}


@dataclass
class TFLiteGraph:
    path: Path
    version: int
    input: TensorInfo
    output: TensorInfo
    ops: list[str]  # every op of the main subgraph, in order
    layers: list[WeightLayer] = field(default_factory=list)

    def count(self, op: str) -> int:
        return self.ops.count(op)


class _Reader:
    def __init__(self, path: Path, data: bytes, where: list[str]) -> None:
        import tflite

        self.tflite = tflite
        self.path = path
        self.data = data
        self.where = where  # what is being read, for the error about a damaged file
        self.model = tflite.Model.GetRootAsModel(data, 0)
        self.opnames = _enum_names(tflite.BuiltinOperator)
        self.typenames = _enum_names(tflite.TensorType)
        self.paddings = _enum_names(tflite.Padding)
        self.activations = _enum_names(tflite.ActivationFunctionType)
        if self.model.SubgraphsLength() < 1:
            raise EdgeBuildError(f"{path.name}: the TFLite model has no subgraph", _HINT)
        self.graph = self.model.Subgraphs(0)

    def op_name(self, op: Any) -> str:
        code = self.model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        return self.opnames.get(builtin, f"op#{builtin}")

    def tensor(self, index: int) -> TensorInfo:
        tensor = self.graph.Tensors(index)
        q = tensor.Quantization()
        quant = None
        if q is not None and q.ScaleLength() > 0:
            scale = q.ScaleAsNumpy().astype(np.float32)
            zero = q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros_like(scale, np.int64)
            if zero.size == 1 and scale.size > 1:
                zero = np.repeat(zero, scale.size)
            quant = Quantization(scale, zero, int(q.QuantizedDimension()))
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        return TensorInfo(
            index=index,
            name=tensor.Name().decode("utf-8", "replace"),
            dtype=self.typenames.get(tensor.Type(), f"type#{tensor.Type()}"),
            shape=shape,
            quantization=quant,
            buffer=int(tensor.Buffer()),
        )

    def raw(self, info: TensorInfo, where: str) -> np.ndarray:
        dtypes = {"UINT8": np.uint8, "INT8": np.int8, "INT32": np.int32, "FLOAT32": np.float32, "INT64": np.int64}
        if info.dtype not in dtypes:
            raise EdgeBuildError(f"{self.path.name}: {where} tensor '{info.name}' has type {info.dtype}", _HINT)
        dtype = np.dtype(dtypes[info.dtype]).newbyteorder("<")
        buffer = self.model.Buffers(info.buffer)
        if buffer.Offset() > 1:  # large models keep tensor data after the flatbuffer
            start, size = int(buffer.Offset()), int(buffer.Size())
            blob = self.data[start : start + size]
            if len(blob) != size:
                raise EdgeBuildError(f"{self.path.name}: data of {where} tensor '{info.name}' is cut off", _HINT)
        else:
            blob = buffer.DataAsNumpy() if buffer.DataLength() else b""
            blob = bytes(blob) if not isinstance(blob, int) else b""
        expected = int(np.prod(info.shape, dtype=np.int64)) * dtype.itemsize
        if len(blob) != expected:
            raise EdgeBuildError(
                f"{self.path.name}: {where} tensor '{info.name}' holds {len(blob)} bytes, its shape {list(info.shape)} "
                f"needs {expected} (truncated or not a constant)",
                _HINT,
            )
        return np.frombuffer(blob, dtype=dtype).reshape(info.shape)

    def dequantized(self, info: TensorInfo, where: str) -> np.ndarray:
        """(q - zero_point) * scale, per channel along the tensor's quantized dimension."""
        values = self.raw(info, where)
        if info.dtype == "FLOAT32":
            return values.astype(np.float32)
        q = info.quantization
        if q is None:
            raise EdgeBuildError(
                f"{self.path.name}: {where} tensor '{info.name}' is {info.dtype} without scales", _HINT
            )
        if q.per_channel:
            if q.axis >= values.ndim or values.shape[q.axis] != q.scale.size:
                raise EdgeBuildError(
                    f"{self.path.name}: {where} tensor '{info.name}' has {q.scale.size} scales for axis {q.axis} "
                    f"of shape {list(values.shape)}",
                    _HINT,
                )
            shape = [1] * values.ndim
            shape[q.axis] = q.scale.size
            scale, zero = q.scale.reshape(shape), q.zero_point.reshape(shape)
        else:
            scale, zero = q.scale[0], q.zero_point[0]
        return ((values.astype(np.int64) - zero).astype(np.float64) * scale).astype(np.float32)

    def options(self, op: Any, name: str) -> Any:
        options_class = {
            "CONV_2D": self.tflite.Conv2DOptions,
            "DEPTHWISE_CONV_2D": self.tflite.DepthwiseConv2DOptions,
            "FULLY_CONNECTED": self.tflite.FullyConnectedOptions,
        }[name]
        table = op.BuiltinOptions()
        options = options_class()
        if table is None:
            raise EdgeBuildError(f"{self.path.name}: {name} op has no options", _HINT)
        options.Init(table.Bytes, table.Pos)
        return options

    def pad_amounts(self, op: Any, where: str) -> tuple[int, int, int, int]:
        paddings = self.raw(self.tensor(int(op.Inputs(1))), where).astype(np.int64)
        if paddings.shape != (4, 2) or paddings[0].any() or paddings[3].any():
            raise EdgeBuildError(
                f"{self.path.name}: {where} pads {paddings.tolist()}; only spatial NHWC padding is supported", _HINT
            )
        return int(paddings[1, 0]), int(paddings[1, 1]), int(paddings[2, 0]), int(paddings[2, 1])

    def read(self) -> TFLiteGraph:
        g = self.graph
        self.where[0] = "the graph's tensors"
        if g.InputsLength() != 1 or g.OutputsLength() < 1:
            raise EdgeBuildError(f"{self.path.name}: expected one input tensor, found {g.InputsLength()}", _HINT)
        graph = TFLiteGraph(
            path=self.path,
            version=int(self.model.Version()),
            input=self.tensor(int(g.Inputs(0))),
            output=self.tensor(int(g.Outputs(0))),
            ops=[],
        )
        pads: dict[int, tuple[int, int, int, int]] = {}  # output tensor of a PAD op -> its padding
        for k in range(g.OperatorsLength()):
            op = g.Operators(k)
            name = self.op_name(op)
            graph.ops.append(name)
            where = f"op {k} ({name})"
            self.where[0] = where
            if name in ("PAD", "PADV2"):
                pads[int(op.Outputs(0))] = self.pad_amounts(op, where)
                continue
            if name not in WEIGHT_OPS:
                continue
            inputs = [int(i) for i in op.InputsAsNumpy()]
            if len(inputs) < 2:
                raise EdgeBuildError(f"{self.path.name}: {where} has no weight tensor", _HINT)
            weight_info = self.tensor(inputs[1])
            bias = None
            if len(inputs) > 2 and inputs[2] >= 0:
                bias = self.dequantized(self.tensor(inputs[2]), where).reshape(-1)
            layer = WeightLayer(
                op_index=k,
                op=name,
                weight_tensor=weight_info,
                weight=self.dequantized(weight_info, where),
                bias=bias,
                explicit_pad=pads.get(inputs[0]),
            )
            options = self.options(op, name)
            layer.activation = self.activations.get(options.FusedActivationFunction(), "?")
            if name != "FULLY_CONNECTED":
                if options.StrideH() != options.StrideW():
                    raise EdgeBuildError(f"{self.path.name}: {where} has unequal strides", _HINT)
                layer.stride = int(options.StrideW())
                layer.padding = self.paddings.get(options.Padding(), "?")
            graph.layers.append(layer)
        return graph


def read_tflite(path: str | Path) -> TFLiteGraph:
    """Parse `path` and return its weight layers, dequantized to float32.

    Raises EdgeBuildError (one line, naming the file and what is wrong) for a file that
    is missing, not a TFLite flatbuffer, truncated or corrupt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise EdgeBuildError(f"weights file not found: {path}", "pass the path of a .tflite file") from exc
    except OSError as exc:
        raise EdgeBuildError(f"cannot read {path}: {exc.strerror or exc}") from exc
    import tflite

    if len(data) < 8 or not tflite.Model.ModelBufferHasIdentifier(data, 0):
        raise EdgeBuildError(f"{path.name}: not a TFLite file (no 'TFL3' identifier)", _HINT)
    where = ["the model header"]
    try:
        return _Reader(path, data, where).read()
    except EdgeBuildError:
        raise
    except (IndexError, struct.error, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        # An offset that points past the end of the data: the flatbuffer is cut off or damaged.
        raise EdgeBuildError(
            f"{path.name}: truncated or corrupt TFLite file ({len(data)} bytes): reading {where[0]} failed "
            f"({type(exc).__name__}: {str(exc)[:120]})",
            "copy the file again; " + _HINT,
        ) from exc
