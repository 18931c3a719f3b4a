"""Bias correction for int8 weights (Nagel et al., "Data-Free Quantization", ICCV 2019, section 4.2).

Rounding a convolution's weights to int8 shifts the mean of its output: with the weight error
eps = dequantize(quantize(W)) - W, channel c's output moves by sum_k eps[c, k] * E[x_k] on
average, and these shifts add up through the depth of MobileNetV2. Folding the opposite of
that shift into the (float) bias removes the systematic part of the error; the bias is then
quantized with the rest of the graph.

E[x] is the per-channel mean of each layer's input in the float model over the calibration
images; eps is read from the quantizer's own int8 weights and scales (ONNX Runtime's QDQ
output: `<weight>_quantized` and `<weight>_scale`), so the correction matches the rounding the
shipped model really has. Quantizing the corrected float model again leaves the weights as
they were (only biases changed) and quantizes the new biases.

Measured on the shared data (224, U8S8 per-channel MinMax, float input), int8 vs fp32 logits
on the 130 validation images, without -> with correction:
    fine-tuned network: mean |error| 0.360 -> 0.157, max 2.61 -> 1.23; top-1 flips on the
                        2,192 training images 5 -> 0, validation top-1 125 -> 126 of 126
    head-only network:  mean |error| 0.203 -> 0.092, max 2.10 -> 0.62
Weight rounding alone (fp32 activations) accounts for 0.316 of the fine-tuned network's 0.360.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_build.quant_graph import node_attribute

#: Conv input means are accumulated over batches of this many calibration images.
BATCH = 25


def _layers(model: Any) -> list[Any]:
    return [node for node in model.graph.node if node.op_type in ("Conv", "Gemm")]


def input_channel_means(model: Any, batches: Sequence[np.ndarray] | Any) -> dict[str, np.ndarray]:
    """Per-channel mean of every Conv/Gemm input of the float `model` over `batches` (node name -> means)."""
    import onnx
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    layers = _layers(probe)
    known = {output.name for output in probe.graph.output}
    inputs = list(dict.fromkeys(node.input[0] for node in layers))
    for name in inputs:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    images = 0
    for batch in batches:
        outputs = session.run(inputs, {feed: batch})
        for name, value in zip(inputs, outputs, strict=True):
            axes = (0, 2, 3) if value.ndim == 4 else (0,)
            total = value.astype(np.float64).sum(axis=axes) / (np.prod([value.shape[a] for a in axes[1:]]) or 1)
            sums[name] = sums.get(name, 0.0) + total
        images += len(batch)
    if images == 0:
        raise ValueError("bias correction needs at least one calibration image")
    return {node.name: sums[node.input[0]] / images for node in layers}


def _dequantized_weight(initializers: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    quantized = initializers.get(f"{name}_quantized")
    scale = initializers.get(f"{name}_scale")
    if quantized is None or scale is None:
        return None
    zero_point = initializers.get(f"{name}_zero_point")
    values = quantized.astype(np.float32)
    if zero_point is not None and np.any(zero_point):
        values = values - zero_point.reshape((-1,) + (1,) * (values.ndim - 1)).astype(np.float32)
    if scale.size == 1:
        return values * scale.astype(np.float32)
    return values * scale.astype(np.float32).reshape((-1,) + (1,) * (values.ndim - 1))


def bias_shift(node: Any, weight: np.ndarray, dequantized: np.ndarray, means: np.ndarray) -> np.ndarray:
    """The mean output shift of `node` caused by its weight rounding: sum_k eps[c, k] * E[x_k] per output c."""
    error = (dequantized - weight).astype(np.float64)
    if node.op_type == "Gemm":
        if node_attribute(node, "transA", 0):
            raise ValueError(f"{node.name}: Gemm with transA is not supported")
        rows = error if node_attribute(node, "transB", 0) else error.T  # (out, in)
        return rows @ means
    group = node_attribute(node, "group", 1)
    out_channels, in_per_group = error.shape[:2]
    per_tap = error.reshape(out_channels, in_per_group, -1).sum(axis=2)  # (out, in/group)
    group_of_output = np.arange(out_channels) // (out_channels // group)
    return (per_tap * means.reshape(group, in_per_group)[group_of_output]).sum(axis=1)


def correct_biases(float_model: Any, quantized_model: Any, means: dict[str, np.ndarray]) -> dict[str, Any]:
    """Subtract every layer's rounding shift from its float bias, in place; a summary for the record.

    Layers the quantizer left in float (excluded nodes) or without a bias are left alone.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in float_model.graph.initializer}
    quantized = {init.name: numpy_helper.to_array(init) for init in quantized_model.graph.initializer}
    corrected, largest = [], 0.0
    for node in _layers(float_model):
        if len(node.input) < 3 or node.input[2] not in initializers or node.name not in means:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        dequantized = _dequantized_weight(quantized, node.input[1])
        if dequantized is None or dequantized.shape != weight.shape:
            continue
        shift = bias_shift(node, weight, dequantized, means[node.name])
        bias_init = initializers[node.input[2]]
        bias = numpy_helper.to_array(bias_init).astype(np.float64)
        bias_init.CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), bias_init.name))
        corrected.append(node.name)
        largest = max(largest, float(np.abs(shift).max()))
    return {"layers": len(corrected), "max_abs_shift": round(largest, 6)}
