"""Graph checks and rewrites around ONNX Runtime's quantizer.

- `require_opset`: the quantizer needs opset >= 13 (per-axis DequantizeLinear); on
  older opsets it writes an invalid model without any error, so refuse up front.
- `name_nodes`: unique node names, so `--exclude-nodes` and sensitivity reports can
  name every node.
- `fold_uint8_input`: let the int8 model take raw uint8 RGB pixels (N, H, W, 3): the
  preprocessing's `x * scale + offset` becomes the first layer's input quantization,
  so no float image is ever materialized and no layout transpose is left at the input.
- `check_quantized`: the produced model passes `onnx.checker`, loads in ONNX Runtime,
  runs, and really holds int8 weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing

MIN_OPSET = 13
UINT8_INPUT_NAME = "image"


def _onnx() -> Any:
    import onnx

    return onnx


def default_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def require_opset(model: Any, source: Path | str) -> int:
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise EdgeBuildError(
            f"{source}: ONNX opset {opset} cannot be quantized (opset >= {MIN_OPSET} needed for per-channel "
            "DequantizeLinear; on older opsets ONNX Runtime's quantizer writes an invalid model without an error)",
            "export with `edge-build export` (opset 17) or upgrade it with onnx.version_converter",
        )
    return opset


def name_nodes(model: Any) -> Any:
    """Give every unnamed (or duplicate-named) node a unique name `<op>_<index>`."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
    return model


def graph_inputs(model: Any) -> list[Any]:
    initializers = {init.name for init in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _initializer(model: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise EdgeBuildError(f"quantized model has no initializer '{name}'", "this is an edge-build bug")


def _replace_initializer(model: Any, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    for index, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(value, name))


def _consumers(model: Any, tensor: str) -> list[Any]:
    return [node for node in model.graph.node if tensor in node.input]


def _producer(model: Any, tensor: str) -> Any | None:
    return next((node for node in model.graph.node if tensor in node.output), None)


def fold_uint8_input(model: Any, preprocessing: Preprocessing, input_name: str = UINT8_INPUT_NAME) -> dict[str, Any]:
    """Rewrite a QDQ model's float NCHW input into raw uint8 NHWC pixels (in place).

    The float input feeds one QuantizeLinear whose DequantizeLinear feeds the first
    convolution(s). The pixels themselves become that quantized tensor: DequantizeLinear
    with scale = preprocessing.scale and zero point round(-offset/scale). When the ideal
    zero point is not an integer (127.5 for x/127.5 - 1) the remaining constant shift is
    folded into each consuming convolution's bias, exact everywhere except the padded border
    (where it stays below half an input quantization step). Returns what was done.
    """
    from onnx import TensorProto, helper

    if preprocessing.layout != "NCHW" or preprocessing.channel_order.upper() != "RGB":
        raise EdgeBuildError(
            "uint8 input folding needs RGB/NCHW preprocessing, "
            f"got {preprocessing.channel_order}/{preprocessing.layout}"
        )
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise EdgeBuildError(f"uint8 input folding needs a model with one input, found {len(inputs)}")
    float_input = inputs[0]
    quantizers = _consumers(model, float_input.name)
    if len(quantizers) != 1 or quantizers[0].op_type != "QuantizeLinear":
        raise EdgeBuildError(
            "uint8 input folding: the model input does not feed exactly one QuantizeLinear",
            "quantize with QDQ format and do not exclude the first convolution",
        )
    quantize = quantizers[0]
    q_zero = _initializer(model, quantize.input[2]) if len(quantize.input) > 2 else np.uint8(0)
    if q_zero.dtype != np.uint8:
        raise EdgeBuildError("uint8 input folding needs uint8 activations (activation_type = 'uint8')")
    scale = np.float32(preprocessing.scale)
    ideal_zero = -preprocessing.offset / preprocessing.scale
    zero = int(np.clip(np.floor(ideal_zero + 0.5), 0, 255))
    shift = np.float32((zero - ideal_zero) * preprocessing.scale)  # dequantized value = true value - shift
    nchw = f"{input_name}_nchw"
    transpose = helper.make_node("Transpose", [input_name], [nchw], name=f"{input_name}_to_nchw", perm=[0, 3, 1, 2])
    folded_convs = []
    for dequantize in _consumers(model, quantize.output[0]):
        if dequantize.op_type != "DequantizeLinear":
            raise EdgeBuildError(f"uint8 input folding: unexpected {dequantize.op_type} after the input quantizer")
        scale_name, zero_name = f"{dequantize.name}_pixel_scale", f"{dequantize.name}_pixel_zero"
        _replace_initializer(model, scale_name, np.array(scale, dtype=np.float32))
        _replace_initializer(model, zero_name, np.array(zero, dtype=np.uint8))
        dequantize.input[:] = [nchw, scale_name, zero_name]
        folded_convs += [
            conv.name for conv in _consumers(model, dequantize.output[0]) if _rebase_bias(model, conv, shift, scale)
        ]
    model.graph.node.remove(quantize)
    model.graph.node.insert(0, transpose)
    dims = float_input.type.tensor_type.shape.dim
    batch = (dims[0].dim_param or dims[0].dim_value) if dims else "batch"
    new_input = helper.make_tensor_value_info(
        input_name, TensorProto.UINT8, [batch, preprocessing.size, preprocessing.size, 3]
    )
    model.graph.input.remove(float_input)
    model.graph.input.insert(0, new_input)
    _drop_unused_initializers(model)
    return {"input": input_name, "scale": float(scale), "zero_point": zero, "shift_folded_into": folded_convs}


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    for init in [init for init in model.graph.initializer if init.name not in used]:
        model.graph.initializer.remove(init)


def _rebase_bias(model: Any, conv: Any, shift: np.float32, input_scale: np.float32) -> bool:
    """Requantize a conv's int32 bias for its new input scale, adding shift * sum(W).

    conv(x - shift) + shift * sum(W) == conv(x) away from the padding. The int32 bias
    of a quantized conv must keep the scale input_scale * weight_scale.
    """
    if conv.op_type != "Conv" or len(conv.input) < 3:
        return False
    weight_dq, bias_dq = _producer(model, conv.input[1]), _producer(model, conv.input[2])
    if any(node is None or node.op_type != "DequantizeLinear" for node in (weight_dq, bias_dq)):
        return False
    weight_q = _initializer(model, weight_dq.input[0]).astype(np.float32)
    weight_scale = _initializer(model, weight_dq.input[1]).astype(np.float32)
    weight_zero = _initializer(model, weight_dq.input[2]).astype(np.float32) if len(weight_dq.input) > 2 else 0.0
    shape = (-1, 1, 1, 1) if weight_scale.ndim == 1 else ()
    weight = (weight_q - np.reshape(weight_zero, shape)) * np.reshape(weight_scale, shape)
    bias_q = _initializer(model, bias_dq.input[0])
    bias_scale = _initializer(model, bias_dq.input[1]).astype(np.float32)
    expected = (input_scale * weight_scale).astype(np.float32)
    bias = bias_q.astype(np.float64) * bias_scale + shift * weight.sum(axis=(1, 2, 3), dtype=np.float64)
    new_bias = np.clip(np.round(bias / expected), -(2**31), 2**31 - 1).astype(np.int32)
    _replace_initializer(model, bias_dq.input[0], new_bias)
    _replace_initializer(model, bias_dq.input[1], np.broadcast_to(expected, bias_scale.shape).astype(np.float32))
    return True


def quantized_weight_count(model: Any) -> int:
    """How many initializers are stored as 8-bit integers (a quantized model has many)."""
    return sum(1 for init in model.graph.initializer if init.data_type in (2, 3))  # UINT8, INT8


def check_quantized(path: Path, sample: np.ndarray) -> None:
    """Refuse an int8 model that onnx.checker rejects, ONNX Runtime cannot load or run, or that holds no int8."""
    onnx = _onnx()
    from edge_build.runners import OnnxRunner

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise EdgeBuildError(
            f"{path}: the quantized model is invalid: {str(exc).splitlines()[0][:300]}",
            "quantize an opset >= 13 model; report this as an edge-build bug if it is one",
        ) from exc
    if quantized_weight_count(model) == 0:
        raise EdgeBuildError(f"{path}: the quantizer produced a model without any int8 weight", "check --exclude-nodes")
    runner = OnnxRunner(path, threads=1)
    logits = runner.run(sample)
    if not np.all(np.isfinite(logits)):
        raise EdgeBuildError(f"{path}: the quantized model produces non-finite outputs", "recalibrate")


def node_attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def group_stem_columns(model: Any, input_name: str = UINT8_INPUT_NAME) -> dict[str, Any] | None:
    """Feed the first (3-channel, 3x3, stride-2) conv 4 pixels per position: 12 channels instead of 3.

    ONNX Runtime's fast int8 convolution (the symmetric indirect kernel) needs a multiple of
    4 input channels; with 3 the stem falls back to im2col + GEMM and is the slowest layer.
    In NHWC, grouping 4 neighbouring pixels of a row into one 12-channel pixel is a free
    reshape, and the stride-2 conv becomes a 3x2 stride-(2,1) conv with 2 x C outputs
    (output pixels 2m and 2m+1), reshaped back for free. The int8 weights are rearranged,
    not requantized: the result is the same integer arithmetic. Returns None (and leaves
    the model alone) when the first layer is not of that shape.
    """
    from onnx import helper

    transposes = [n for n in _consumers(model, input_name) if n.op_type == "Transpose"]
    if len(transposes) != 1:
        return None
    input_dq = _consumers(model, transposes[0].output[0])
    if len(input_dq) != 1 or input_dq[0].op_type != "DequantizeLinear":
        return None
    convs = _consumers(model, input_dq[0].output[0])
    if len(convs) != 1 or convs[0].op_type != "Conv" or len(convs[0].input) < 3:
        return None
    conv = convs[0]
    weight_dq, bias_dq = _producer(model, conv.input[1]), _producer(model, conv.input[2])
    quantizers = _consumers(model, conv.output[0])
    if (
        weight_dq is None
        or bias_dq is None
        or weight_dq.op_type != "DequantizeLinear"
        or bias_dq.op_type != "DequantizeLinear"
        or len(quantizers) != 1
        or quantizers[0].op_type != "QuantizeLinear"
    ):
        return None
    weight = _initializer(model, weight_dq.input[0])
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    strides = list(node_attribute(conv, "strides", [1, 1]))
    dilations = list(node_attribute(conv, "dilations", [1, 1]))
    pads = list(node_attribute(conv, "pads", [0, 0, 0, 0]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    height, width = dims[1].dim_value, dims[2].dim_value
    if (
        in_channels != 3
        or (kernel_h, kernel_w) != (3, 3)
        or strides != [2, 2]
        or dilations != [1, 1]
        or node_attribute(conv, "group", 1) != 1
        or node_attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or not width
        or width % 4
        or height % 2
    ):
        return None
    pad_left = pads[1]
    offsets = [2 * s - pad_left + k for s in (0, 1) for k in range(kernel_w)]
    first_group = min(o // 4 for o in offsets)
    last_group = max(o // 4 for o in offsets)
    grouped = np.zeros((2 * out_channels, 12, kernel_h, last_group - first_group + 1), dtype=weight.dtype)
    for s in (0, 1):
        for k in range(kernel_w):
            offset = 2 * s - pad_left + k
            group, position = offset // 4, offset % 4
            grouped[
                s * out_channels : (s + 1) * out_channels, position * 3 : position * 3 + 3, :, group - first_group
            ] = weight[:, :, :, k]
    doubled = [np.concatenate([_initializer(model, name)] * 2) for name in (weight_dq.input[1], bias_dq.input[0])]
    names = {
        "w": f"{conv.name}_grouped_w",
        "w_scale": f"{conv.name}_grouped_w_scale",
        "w_zero": f"{conv.name}_grouped_w_zero",
        "b": f"{conv.name}_grouped_b",
        "b_scale": f"{conv.name}_grouped_b_scale",
        "in_shape": f"{conv.name}_grouped_in_shape",
        "out_shape": f"{conv.name}_grouped_out_shape",
    }
    _replace_initializer(model, names["w"], grouped)
    _replace_initializer(model, names["w_scale"], doubled[0])
    _replace_initializer(model, names["b"], doubled[1])
    _replace_initializer(model, names["b_scale"], np.concatenate([_initializer(model, bias_dq.input[1])] * 2))
    weight_zero = (
        _initializer(model, weight_dq.input[2]) if len(weight_dq.input) > 2 else np.zeros(out_channels, np.int8)
    )
    _replace_initializer(model, names["w_zero"], np.concatenate([np.broadcast_to(weight_zero, (out_channels,))] * 2))
    _replace_initializer(model, names["in_shape"], np.array([0, height, width // 4, 12], dtype=np.int64))
    _replace_initializer(
        model, names["out_shape"], np.array([0, height // 2, width // 2, out_channels], dtype=np.int64)
    )
    quantize = quantizers[0]
    original_q_output = quantize.output[0]
    prefix = f"{conv.name}_grouped"
    weight_axis = node_attribute(weight_dq, "axis", 1)
    nodes = [
        helper.make_node("Reshape", [input_name, names["in_shape"]], [f"{prefix}_in_nhwc"], name=f"{prefix}_in"),
        helper.make_node(
            "Transpose", [f"{prefix}_in_nhwc"], [f"{prefix}_in_nchw"], name=f"{prefix}_in_t", perm=[0, 3, 1, 2]
        ),
        helper.make_node(
            "DequantizeLinear", [f"{prefix}_in_nchw", *input_dq[0].input[1:]], [f"{prefix}_x"], name=f"{prefix}_x_dq"
        ),
        helper.make_node(
            "DequantizeLinear",
            [names["w"], names["w_scale"], names["w_zero"]],
            [f"{prefix}_w_f"],
            name=f"{prefix}_w_dq",
            axis=weight_axis,
        ),
        helper.make_node(
            "DequantizeLinear", [names["b"], names["b_scale"]], [f"{prefix}_b_f"], name=f"{prefix}_b_dq", axis=0
        ),
        helper.make_node(
            "Conv",
            [f"{prefix}_x", f"{prefix}_w_f", f"{prefix}_b_f"],
            [f"{prefix}_y"],
            name=conv.name,
            kernel_shape=[kernel_h, last_group - first_group + 1],
            strides=[2, 1],
            pads=[pads[0], -first_group, pads[2], last_group],
        ),
        helper.make_node("QuantizeLinear", [f"{prefix}_y", *quantize.input[1:]], [f"{prefix}_q"], name=f"{prefix}_y_q"),
        helper.make_node("Transpose", [f"{prefix}_q"], [f"{prefix}_q_nhwc"], name=f"{prefix}_out_t", perm=[0, 2, 3, 1]),
        helper.make_node(
            "Reshape", [f"{prefix}_q_nhwc", names["out_shape"]], [f"{prefix}_out_nhwc"], name=f"{prefix}_out"
        ),
        helper.make_node(
            "Transpose", [f"{prefix}_out_nhwc"], [original_q_output], name=f"{prefix}_out_nchw", perm=[0, 3, 1, 2]
        ),
    ]
    for old in (transposes[0], input_dq[0], conv, quantize):
        model.graph.node.remove(old)
    for old in (weight_dq, bias_dq):
        if not _consumers(model, old.output[0]):
            model.graph.node.remove(old)
    for index, node in enumerate(nodes):
        model.graph.node.insert(index, node)
    _drop_unused_initializers(model)
    return {"conv": conv.name, "input_channels": 12, "kernel": [kernel_h, last_group - first_group + 1]}


def pool_to_global_average(model: Any) -> list[str]:
    """Rewrite ReduceMean over H,W of a 4-D tensor (keepdims=0) as GlobalAveragePool + Flatten (in place).

    Same values; but GlobalAveragePool has an int8 kernel that works on NHWC, so the int8
    graph pools without leaving the integer domain and without the layout transpose back to
    NCHW that a float ReduceMean needs. Returns the names of the rewritten nodes.
    """
    from onnx import helper

    rewritten = []
    shapes = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    for node in list(model.graph.node):
        if node.op_type != "ReduceMean":
            continue
        axes = node_attribute(node, "axes", None)
        if axes is None and len(node.input) > 1:
            constant = next((i for i in model.graph.initializer if i.name == node.input[1]), None)
            axes = None if constant is None else _initializer(model, constant.name).tolist()
        info = shapes.get(node.input[0])
        rank = len(info.type.tensor_type.shape.dim) if info is not None else None
        if rank != 4 or sorted(int(a) % 4 for a in axes or []) != [2, 3] or node_attribute(node, "keepdims", 1) != 0:
            continue
        index = list(model.graph.node).index(node)
        pooled = f"{node.output[0]}_pooled"
        model.graph.node.remove(node)
        model.graph.node.insert(index, helper.make_node("Flatten", [pooled], [node.output[0]], name=node.name, axis=1))
        model.graph.node.insert(
            index, helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=f"{node.name}_pool")
        )
        rewritten.append(node.name)
    _drop_unused_initializers(model)
    return rewritten
