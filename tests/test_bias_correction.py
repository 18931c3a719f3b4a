"""Bias correction: the rounding shift it removes is exactly the mean output shift of a linear layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_build.bias_correction import correct_biases, input_channel_means

CHANNELS, SIZE = 6, 9


def _layer_model(kind: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """One Conv (full or depthwise, 3x3, no padding) or Gemm (transB) with a bias; returns (model, weight)."""
    if kind == "gemm":
        weight = rng.normal(size=(5, CHANNELS)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="layer", transB=1)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, CHANNELS])
        outputs = 5
    else:
        group = CHANNELS if kind == "depthwise" else 1
        outputs = CHANNELS if kind == "depthwise" else 4
        weight = rng.normal(size=(outputs, CHANNELS // group, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", group=group, kernel_shape=[3, 3])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, CHANNELS, SIZE, SIZE])
    bias = rng.normal(size=outputs).astype(np.float32)
    graph = helper.make_graph(
        [node],
        kind,
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weight


def _quantized_initializers(weight: np.ndarray) -> onnx.ModelProto:
    """What ONNX Runtime's QDQ output holds for a weight: w_quantized (int8) and w_scale per output channel."""
    scale = np.abs(weight).reshape(len(weight), -1).max(axis=1) / 7.0  # coarse (4-bit) so the error shows
    shape = (-1,) + (1,) * (weight.ndim - 1)
    quantized = np.clip(np.round(weight / scale.reshape(shape)), -7, 7).astype(np.int8)
    graph = helper.make_graph(
        [],
        "quantized",
        [],
        [],
        [
            numpy_helper.from_array(quantized, "w_quantized"),
            numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
        ],
    )
    return helper.make_model(graph)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _with_weight(model: onnx.ModelProto, weight: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    target = next(i for i in copy.graph.initializer if i.name == "w")
    target.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), "w"))
    return copy


@pytest.mark.parametrize("kind", ["conv", "depthwise", "gemm"])
def test_corrected_bias_restores_the_mean_output_of_a_rounded_layer(kind):
    rng = np.random.default_rng(3)
    model, weight = _layer_model(kind, rng)
    # a different non-zero mean per channel (the shift depends on E[x]); constant over the image, so the
    # unpadded 3x3 windows see the same mean as the whole input (the correction ignores borders)
    x = rng.normal(size=(64, CHANNELS)) + np.linspace(-2, 3, CHANNELS)
    if kind != "gemm":
        x = np.broadcast_to(x[:, :, None, None], (64, CHANNELS, SIZE, SIZE))
    x = np.ascontiguousarray(x, dtype=np.float32)
    quantized = _quantized_initializers(weight)
    dequantized = numpy_helper.to_array(quantized.graph.initializer[0]).astype(np.float32) * numpy_helper.to_array(
        quantized.graph.initializer[1]
    ).reshape((-1,) + (1,) * (weight.ndim - 1))
    axes = (0,) if kind == "gemm" else (0, 2, 3)
    reference = _run(model, x).mean(axis=axes)
    rounded = _run(_with_weight(model, dequantized), x).mean(axis=axes)
    assert np.abs(rounded - reference).max() > 0.05, (
        "the coarse rounding must shift the mean for the test to mean anything"
    )

    means = input_channel_means(model, [x[:40], x[40:]])
    np.testing.assert_allclose(means["layer"], x.mean(axis=axes), rtol=1e-5, atol=1e-5)
    summary = correct_biases(model, quantized, means)
    assert summary["layers"] == 1 and summary["max_abs_shift"] > 0.05

    corrected = _run(_with_weight(model, dequantized), x).mean(axis=axes)
    np.testing.assert_allclose(corrected, reference, atol=1e-4)


def test_layers_the_quantizer_left_in_float_are_not_touched():
    rng = np.random.default_rng(0)
    model, _ = _layer_model("conv", rng)
    before = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b")).copy()
    x = rng.normal(size=(4, CHANNELS, SIZE, SIZE)).astype(np.float32)
    summary = correct_biases(
        model, helper.make_model(helper.make_graph([], "empty", [], [])), input_channel_means(model, [x])
    )
    assert summary["layers"] == 0
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b")), before
    )
