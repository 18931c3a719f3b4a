"""Small, exactly understood models and data sets for the calibration/quantization tests.

The "colour" data set: 26 classes, class k = a flat colour c_k (plus noise). The colour
network: a 3x3 stride-2 conv (TF-SAME padding) whose ReLU features are relu(+c) and
relu(-c) of the mean colour of each 3x3 patch, global average pooling, and a linear head
whose logit k is 2 c_k.m - |c_k|^2 (nearest colour wins). fp32 top-1 is 100 %.

`big_channel=True` adds one conv output channel with a huge weight and a bias that keeps
it below zero (so ReLU kills it): harmless in float and with per-channel int8 weights,
but with per-tensor weights it takes the whole int8 range and rounds every colour weight
to zero, so int8 top-1 collapses. That is the accuracy gate's deliberate failure.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from edge_build.taxonomy import CODES

SIZE = 32
FEATURES = 8
CONV_NAME = "colour_conv"
HEAD_NAME = "colour_head"


def class_colours() -> np.ndarray:
    """26 colours in preprocessed units (-1..1), pairwise at least 0.8 apart."""
    grid = [np.array(p, dtype=np.float32) for p in itertools.product((-0.8, 0.0, 0.8), repeat=3)]
    return np.stack(grid[:26])


def make_colour_dataset(root: Path, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    colours = class_colours()
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, code in enumerate(CODES):
            folder = root / split / code
            folder.mkdir(parents=True, exist_ok=True)
            pixel = (colours[index] + 1.0) * 127.5
            for number in range(count):
                noise = rng.normal(0, 6, size=(SIZE, SIZE, 3))
                image = np.clip(pixel + noise, 0, 255).astype(np.uint8)
                Image.fromarray(image, "RGB").save(folder / f"{split}_{number:02d}.png")
    return root


def make_colour_model(path: Path, opset: int = 17, big_channel: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    colours = class_colours()
    weight = np.zeros((FEATURES, 3, 3, 3), dtype=np.float32)
    bias = np.zeros(FEATURES, dtype=np.float32)
    for channel in range(3):
        weight[channel, channel] = 1.0 / 9.0
        weight[channel + 3, channel] = -1.0 / 9.0
    if big_channel:
        weight[7, 0] = 1000.0
        bias[7] = -20000.0
    head = np.zeros((26, FEATURES), dtype=np.float32)
    head[:, 0:3] = 2.0 * colours
    head[:, 3:6] = -2.0 * colours
    head_bias = -np.sum(colours**2, axis=1).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "w", "b"],
            ["conv"],
            name=CONV_NAME,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[0, 0, 1, 1],
        ),
        helper.make_node("Relu", ["conv"], ["relu"], name="colour_relu"),
        helper.make_node("ReduceMean", ["relu"], ["pooled"], name="colour_pool", axes=[2, 3], keepdims=0)
        if opset < 18
        else helper.make_node("ReduceMean", ["relu", "axes"], ["pooled"], name="colour_pool", keepdims=0),
        helper.make_node("Gemm", ["pooled", "hw", "hb"], ["logits"], name=HEAD_NAME, transB=1),
    ]
    initializers = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(head, "hw"),
        numpy_helper.from_array(head_bias, "hb"),
    ]
    if opset >= 18:
        initializers.append(numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"))
    graph = helper.make_graph(
        nodes,
        "colours",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 26])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    helper.set_model_props(model, {"edge_build.preprocessing": f'{{"size": {SIZE}}}'})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
