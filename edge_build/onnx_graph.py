"""Graph transformations that turn MindSpore's ONNX export into a deployable model.

`mindspore.export(..., file_format="ONNX")` (2.7) writes opset 11, a static batch, tensor
names like "1"/"7", and copies a Conv's explicit `pads` in MindSpore's order
(top, bottom, left, right) where ONNX means (top, left, bottom, right). With TF-SAME
weights (one extra row/column at the bottom/right of every stride-2 conv) that last one
shifts every stride-2 output by a pixel and the graph is silently wrong.

Each fix is a function `model -> model` (working in place on the `ModelProto` and returning
it), tested on its own; `finish_mindspore_export` applies them in the one valid order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing

#: ONNX opset the artifacts are written in: >= 13 for ORT's quantizer (per-axis
#: DequantizeLinear), 17 is supported by every ONNX Runtime since 1.11, mobile included.
TARGET_OPSET = 17
#: IR version written with TARGET_OPSET (the oldest that carries it, for old runtimes).
TARGET_IR_VERSION = 8

INPUT_NAME = "input"
UINT8_INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
BATCH_DIM = "batch"

#: ops whose `pads` attribute MindSpore writes as (top, bottom, left, right)
_PADDED_OPS = frozenset({"Conv", "AveragePool", "MaxPool", "LpPool", "ConvTranspose"})
METADATA_PREFIX = "edge_build."


def _onnx() -> Any:
    import onnx

    return onnx


def fix_pad_order(model: Any) -> list[str]:
    """Reorder 2-D `pads` from MindSpore's (top, bottom, left, right) to ONNX's (top, left, bottom, right).

    Only for graphs straight out of MindSpore's exporter, and only once: applied to a
    correct graph it introduces the very bug it fixes. Returns the names of the nodes
    whose pads changed (symmetric pads read the same in both orders).
    """
    onnx = _onnx()
    changed = []
    for node in model.graph.node:
        if node.op_type not in _PADDED_OPS:
            continue
        for attribute in node.attribute:
            if attribute.name != "pads" or len(attribute.ints) != 4:
                continue
            top, bottom, left, right = attribute.ints
            fixed = [top, left, bottom, right]
            if fixed != list(attribute.ints):
                attribute.CopyFrom(onnx.helper.make_attribute("pads", fixed))
                changed.append(node.name)
    return changed


def conv_pads(model: Any) -> list[tuple[str, list[int]]]:
    """(node name, pads in ONNX order) of every Conv, in graph order; [] pads for auto_pad."""
    result = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [])
            result.append((node.name, pads))
    return result


def upgrade_opset(model: Any, opset: int = TARGET_OPSET) -> Any:
    """Convert the default-domain opset (MindSpore writes 11) to `opset` and set a matching IR version."""
    onnx = _onnx()
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        raise EdgeBuildError("ONNX model has no default-domain opset import", "it was not written by an ONNX exporter")
    if current < opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:  # the converter raises RuntimeError/ConvertError/ValidationError
            raise EdgeBuildError(
                f"ONNX opset {current} -> {opset} conversion failed: {str(exc).splitlines()[0][:200]}",
                "an op without an adapter is in the graph; export with a simpler network or a newer onnx",
            ) from exc
    model.ir_version = max(model.ir_version, TARGET_IR_VERSION)
    del onnx
    return model


def _tensor_type_shape(value_info: Any) -> Any:
    return value_info.type.tensor_type.shape


def _static_batch(model: Any) -> int | None:
    dims = _tensor_type_shape(model.graph.input[0]).dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def make_batch_dynamic(model: Any, dim_name: str = BATCH_DIM) -> list[str]:
    """Make dim 0 of every graph input and output symbolic, and un-bake the batch from Reshape shapes.

    MindSpore traces with one concrete batch size and writes it into the input/output
    shapes, into every intermediate `value_info`, and into the shape constants of
    Reshape nodes (`x.reshape(N, -1)`). The first two are rewritten; the intermediate
    shapes are dropped (ONNX Runtime infers them); a Reshape whose shape constant starts
    with the traced batch gets 0 there ("copy the input's dim 0"), which keeps its
    meaning for every batch size. Returns the names of the Reshape nodes changed.
    """
    onnx = _onnx()
    batch = _static_batch(model)
    for value in (*model.graph.input, *model.graph.output):
        dims = _tensor_type_shape(value).dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = dim_name
    del model.graph.value_info[:]
    if batch is None:
        return []
    constants = {init.name: init for init in model.graph.initializer}
    constant_nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    changed = []
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape_name = node.input[1]
        if shape_name in constants:
            tensor = constants[shape_name]
        elif shape_name in constant_nodes:
            tensor = next(a.t for a in constant_nodes[shape_name].attribute if a.name == "value")
        else:
            continue  # computed at run time from Shape: already batch-agnostic
        shape = onnx.numpy_helper.to_array(tensor).astype(np.int64)
        if shape.ndim == 1 and shape.size and shape[0] == batch:
            fixed = shape.copy()
            allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
            if allow_zero and -1 in shape:
                raise EdgeBuildError(f"Reshape {node.name}: cannot make its batch dynamic (allowzero and -1)")
            fixed[0] = -1 if allow_zero else 0
            # a private copy: the same constant may feed a node that must keep it
            new_name = f"{shape_name}__dynamic_batch"
            model.graph.initializer.append(onnx.numpy_helper.from_array(fixed, new_name))
            node.input[1] = new_name
            changed.append(node.name)
    return changed


def _rename_tensor(model: Any, old: str, new: str) -> None:
    if old == new:
        return
    graph = model.graph
    taken = {v.name for v in (*graph.input, *graph.output, *graph.initializer)} | {
        name for node in graph.node for name in node.output
    }
    if new in taken:
        raise EdgeBuildError(f"cannot rename ONNX tensor '{old}' to '{new}': the name is taken")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def name_io(model: Any, input_name: str = INPUT_NAME, output_name: str = LOGITS_NAME) -> Any:
    """Give the (single) graph input and first output stable names."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1 or not model.graph.output:
        raise EdgeBuildError(f"expected one graph input and an output, found {len(inputs)} inputs")
    _rename_tensor(model, inputs[0].name, input_name)
    _rename_tensor(model, model.graph.output[0].name, output_name)
    return model


def set_metadata(model: Any, metadata: Mapping[str, Any], doc: str | None = None) -> Any:
    """Store `metadata` in `metadata_props` (non-string values as JSON), replacing earlier keys."""
    onnx = _onnx()
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in metadata.items():
        props[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name = "edge-build"
    if doc:
        model.doc_string = doc
    return model


def load_model(path: Any) -> Any:
    """`onnx.load` for a file that may be damaged or not ONNX at all: a one-line error naming it."""
    onnx = _onnx()
    hint = "the file is truncated or not an ONNX model; rebuild it with `edge-build export`"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise EdgeBuildError(f"ONNX model not found: {path}", "run `edge-build export` first") from None
    except Exception as exc:  # protobuf's DecodeError and friends, for any bytes that are not a ModelProto
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise EdgeBuildError(f"{path}: not a readable ONNX model ({reason})", hint) from exc
    if not model.graph.node:  # an empty or foreign file can parse as an empty ModelProto
        raise EdgeBuildError(f"{path}: not an ONNX model (no graph)", hint)
    return model


def read_metadata(model_or_path: Any) -> dict[str, Any]:
    """`metadata_props` back as a dict, JSON values decoded."""
    model = model_or_path
    if not hasattr(model, "metadata_props"):
        model = load_model(model_or_path)
    result: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            result[prop.key] = json.loads(prop.value)
        except ValueError:
            result[prop.key] = prop.value
    return result


def add_softmax_output(model: Any, logits: str = LOGITS_NAME, name: str = PROBABILITIES_NAME) -> Any:
    """Add `name` = Softmax(logits) over the class axis as a second graph output."""
    onnx = _onnx()
    graph = model.graph
    if name in {o.name for o in graph.output}:
        return model
    source = next((o for o in graph.output if o.name == logits), None)
    if source is None:
        raise EdgeBuildError(f"ONNX model has no output named '{logits}'", "name the outputs first (name_io)")
    graph.node.append(onnx.helper.make_node("Softmax", [logits], [name], name="edge_build_softmax", axis=-1))
    output = onnx.ValueInfoProto()
    output.CopyFrom(source)
    output.name = name
    graph.output.append(output)
    return model


def embed_preprocessing(
    model: Any,
    preprocessing: Preprocessing,
    scale: Iterable[float] | None = None,
    offset: Iterable[float] | None = None,
    input_name: str = UINT8_INPUT_NAME,
) -> Any:
    """Replace the float NCHW input with raw uint8 RGB images (N, size, size, 3) NHWC.

    The graph does Cast -> Mul(scale) -> Add(offset) -> Transpose, the same float32
    arithmetic as `Preprocessing.normalize`, so the variant matches the float model bit
    for bit on the same resized pixels. `scale`/`offset` (per channel) override the
    preprocessing's scalars; they exist to build deliberately wrong graphs in tests.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise EdgeBuildError("embed_preprocessing needs a model with one float input")
    float_input = inputs[0]
    if preprocessing.layout != "NCHW":
        raise EdgeBuildError(f"embedding preprocessing for layout {preprocessing.layout} is not supported")
    scale_values = np.array(list(scale) if scale is not None else [preprocessing.scale] * 3, dtype=np.float32)
    offset_values = np.array(list(offset) if offset is not None else [preprocessing.offset] * 3, dtype=np.float32)
    nodes = [helper.make_node("Cast", [input_name], ["pre_float"], name="pre_cast", to=TensorProto.FLOAT)]
    current = "pre_float"
    if preprocessing.channel_order.upper() == "BGR":
        graph.initializer.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), "pre_bgr_index"))
        nodes.append(helper.make_node("Gather", [current, "pre_bgr_index"], ["pre_bgr"], name="pre_bgr", axis=3))
        current = "pre_bgr"
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale_values.reshape(1, 1, 1, 3), "pre_scale"),
            numpy_helper.from_array(offset_values.reshape(1, 1, 1, 3), "pre_offset"),
        ]
    )
    nodes += [
        helper.make_node("Mul", [current, "pre_scale"], ["pre_scaled"], name="pre_scale"),
        helper.make_node("Add", ["pre_scaled", "pre_offset"], ["pre_shifted"], name="pre_offset"),
        helper.make_node("Transpose", ["pre_shifted"], [float_input.name], name="pre_to_nchw", perm=[0, 3, 1, 2]),
    ]
    dims = _tensor_type_shape(float_input).dim
    batch = dims[0].dim_param or dims[0].dim_value if dims else BATCH_DIM
    new_input = helper.make_tensor_value_info(
        input_name, TensorProto.UINT8, [batch, preprocessing.size, preprocessing.size, 3]
    )
    graph.input.remove(float_input)
    graph.input.insert(0, new_input)
    for index, node in enumerate(nodes):
        graph.node.insert(index, node)
    del onnx
    return model


def expose_outputs(model: Any, tensor_names: Iterable[str]) -> Any:
    """Add intermediate tensors as graph outputs (type and shape left to the runtime)."""
    onnx = _onnx()
    present = {o.name for o in model.graph.output}
    for name in tensor_names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return model


def check(model: Any, what: str) -> None:
    """`onnx.checker` full check (types and shapes inferred strictly); an EdgeBuildError naming `what`."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise EdgeBuildError(
            f"{what}: onnx.checker rejects the model: {str(exc).splitlines()[0][:300]}",
            "a graph transformation produced an invalid model; this is an edge-build bug",
        ) from exc


def finish_mindspore_export(model: Any, output_name: str = LOGITS_NAME) -> Any:
    """All fixes, in order, for a graph straight from `mindspore.export(file_format="ONNX")`.

    pads first (MindSpore's order must be read before anything else touches the graph),
    then the opset (the converter works with the static shapes MindSpore wrote), then
    the dynamic batch and the names.
    """
    fix_pad_order(model)
    model = upgrade_opset(model)
    make_batch_dynamic(model)
    name_io(model, output_name=output_name)
    return model
