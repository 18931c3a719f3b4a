"""ONNX graph transformations, each checked with ONNX Runtime against the MindSpore network."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_nets import PREPROCESSING, SIZE, forward, random_images, tiny_classifier
from onnx import TensorProto, helper, numpy_helper

from edge_build import onnx_graph
from edge_build.errors import EdgeBuildError
from edge_build.export import raw_onnx_export
from edge_build.preprocessing import Preprocessing


def run(model: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: feed})


@pytest.fixture(scope="module")
def net():
    return tiny_classifier(seed=0, batch_norm=False)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return random_images(2)


@pytest.fixture(scope="module")
def expected(net, pixels) -> np.ndarray:
    return forward(net, pixels)


@pytest.fixture
def raw(net) -> onnx.ModelProto:
    return raw_onnx_export(net, SIZE)


def test_mindspore_writes_pads_in_its_own_order_and_the_graph_is_wrong(raw, pixels, expected):
    assert raw.opset_import[0].version == 11
    pads = [p for _, p in onnx_graph.conv_pads(raw) if p]
    assert [0, 1, 0, 1] in pads  # (top, bottom, left, right) = one extra row and column at the end
    error = np.abs(run(raw, PREPROCESSING.normalize(pixels))[0] - expected).max()
    assert error > 1e-2, "MindSpore's exporter now writes ONNX pad order: fix_pad_order must go"


def test_fix_pad_order_makes_onnx_runtime_agree(raw, pixels, expected):
    changed = onnx_graph.fix_pad_order(raw)
    assert len(changed) == 3  # the three stride-2 convs; symmetric pads are left alone
    assert [0, 0, 1, 1] in [p for _, p in onnx_graph.conv_pads(raw)]
    assert np.abs(run(raw, PREPROCESSING.normalize(pixels))[0] - expected).max() < 1e-5
    onnx_graph.fix_pad_order(raw)  # applied twice it is the bug again: it belongs to the pipeline once
    assert np.abs(run(raw, PREPROCESSING.normalize(pixels))[0] - expected).max() > 1e-2


def test_upgrade_to_opset_17_passes_full_check(raw, pixels, expected):
    onnx_graph.fix_pad_order(raw)
    model = onnx_graph.upgrade_opset(raw)
    assert model.opset_import[0].version == onnx_graph.TARGET_OPSET
    assert model.ir_version >= onnx_graph.TARGET_IR_VERSION
    onnx_graph.check(model, "test")
    assert np.abs(run(model, PREPROCESSING.normalize(pixels))[0] - expected).max() < 1e-5


def test_dynamic_batch_runs_any_batch_size(net, raw):
    onnx_graph.fix_pad_order(raw)
    model = onnx_graph.upgrade_opset(raw)
    onnx_graph.make_batch_dynamic(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx_graph.check(model, "test")
    many = random_images(5, seed=3)
    for count in (1, 5):
        got = run(model, PREPROCESSING.normalize(many[:count]))[0]
        assert got.shape == (count, 5)
        assert np.abs(got - forward(net, many[:count])).max() < 1e-5


def _reshape_model(batch: int, shape: list[int], as_constant_node: bool) -> onnx.ModelProto:
    """x (batch, 2, 3) -> Reshape(shape) -> y, the way a traced `x.reshape(N, -1)` is written."""
    shape_tensor = numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="flatten")]
    initializers = []
    if as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["shape"], value=shape_tensor))
    else:
        initializers.append(shape_tensor)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 6])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("as_constant_node", [False, True])
@pytest.mark.parametrize("shape", [[2, -1], [2, 6]])
def test_dynamic_batch_unbakes_reshape_constants(shape, as_constant_node):
    model = _reshape_model(2, shape, as_constant_node)
    x = np.arange(5 * 6, dtype=np.float32).reshape(5, 2, 3)
    with pytest.raises(Exception, match=r"(?i)reshape|shape|dimension"):
        run(model, x)  # the baked batch of 2 refuses 5 images
    assert onnx_graph.make_batch_dynamic(model) == ["flatten"]
    onnx_graph.check(model, "test")
    np.testing.assert_array_equal(run(model, x)[0], x.reshape(5, 6))


def test_name_io_and_metadata_roundtrip(raw):
    model = onnx_graph.upgrade_opset(raw)
    onnx_graph.name_io(model)
    labels = [{"code": "00_00", "chinese": "塑料瓶", "bin": "recyclable"}]
    onnx_graph.set_metadata(model, {"edge_build.labels": labels, "edge_build.version": "0.1.0"})
    onnx_graph.check(model, "test")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    # ONNX Runtime exposes the same metadata to deployments
    assert session.get_modelmeta().custom_metadata_map["edge_build.version"] == "0.1.0"
    assert onnx_graph.read_metadata(model)["edge_build.labels"] == labels


def test_softmax_output_is_probabilities(raw, pixels, expected):
    onnx_graph.fix_pad_order(raw)
    model = onnx_graph.upgrade_opset(raw)
    onnx_graph.name_io(model)
    onnx_graph.add_softmax_output(model)
    onnx_graph.check(model, "test")
    _, probabilities = run(model, PREPROCESSING.normalize(pixels))
    reference = np.exp(expected - expected.max(1, keepdims=True))
    reference /= reference.sum(1, keepdims=True)
    assert np.abs(probabilities - reference).max() < 1e-6
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-6)


def test_embedded_preprocessing_matches_float_model_bit_for_bit(raw, pixels):
    onnx_graph.fix_pad_order(raw)
    model = onnx_graph.upgrade_opset(raw)
    onnx_graph.make_batch_dynamic(model)
    onnx_graph.name_io(model)
    float_logits = run(model, PREPROCESSING.normalize(pixels))[0]
    onnx_graph.embed_preprocessing(model, PREPROCESSING)
    onnx_graph.check(model, "test")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert (image.name, image.type, image.shape) == ("image", "tensor(uint8)", ["batch", SIZE, SIZE, 3])
    np.testing.assert_array_equal(session.run(None, {"image": pixels})[0], float_logits)


def test_embedded_bgr_preprocessing_swaps_channels(raw, pixels):
    model = onnx_graph.upgrade_opset(raw)
    onnx_graph.name_io(model)
    rgb_logits = run(model, PREPROCESSING.normalize(pixels))[0]
    onnx_graph.embed_preprocessing(model, Preprocessing(size=SIZE, channel_order="BGR"))
    onnx_graph.check(model, "test")
    np.testing.assert_array_equal(run(model, np.ascontiguousarray(pixels[..., ::-1]))[0], rgb_logits)


def test_expose_outputs_gives_intermediate_tensors(raw, pixels):
    onnx_graph.fix_pad_order(raw)
    model = onnx_graph.upgrade_opset(raw)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    onnx_graph.expose_outputs(model, convs)
    outputs = run(model, PREPROCESSING.normalize(pixels))
    assert len(outputs) == 1 + len(convs)
    assert outputs[1].shape == (2, 8, SIZE // 2, SIZE // 2)


def test_checker_failure_is_an_edge_build_error(raw):
    raw.graph.node[0].input[0] = "no_such_tensor"
    with pytest.raises(EdgeBuildError, match=r"onnx\.checker rejects"):
        onnx_graph.check(raw, "broken.onnx")
