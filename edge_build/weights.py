"""The weights import stage: a MobileNetV2 1.0 TFLite file -> MindSpore checkpoints + metadata.

The TFLite weights have BatchNorm folded into each conv's bias. The network is built
with BatchNorm (so it can be fine-tuned), and the folded bias is mapped onto it exactly:
gamma = 1, beta = bias, moving_mean = 0, moving_variance = 1 - eps (so that
1/sqrt(var + eps) = 1). `fold_batchnorm` turns it back into the fast inference form.

Outputs, in build/weights/<sha256[:16]>/ (cached by the source's sha256 via run_stage):
  backbone.ckpt       the backbone (BatchNorm form), parameters `backbone.*`
  imagenet_head.ckpt  the source model's own ImageNet classifier as `head.*` (1001 or 1000 classes)
  weights.json        what the weights expect: preprocessing, padding, input, classes, source
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_build import atomic, network
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.preprocessing import Preprocessing
from edge_build.stages import clear, run_stage
from edge_build.tflite_reader import TFLiteGraph, WeightLayer, read_tflite

STAGE = "weights"
IMPORTER_VERSION = 1
METADATA_NAME = "weights.json"
BACKBONE_NAME = "backbone.ckpt"
IMAGENET_HEAD_NAME = "imagenet_head.ckpt"
RESIDUAL_ADDS = sum(1 for block in network.block_specs() if block.residual)  # 10

#: The preprocessing MobileNetV2 was trained with (Inception style, 0..255 -> -1..1).
PREPROCESSING = Preprocessing(size=network.INPUT_SIZE, scale=1.0 / 127.5, offset=-1.0, channel_order="RGB")

_HINT = "use an unmodified MobileNetV2 1.0 224 .tflite file (see ../shared/weights/SOURCE.md)"


@dataclass
class ImportedWeights:
    directory: Path
    checkpoint: Path  # the backbone checkpoint (BatchNorm form)
    metadata: dict[str, Any]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def padding(self) -> str:
        return str(self.metadata["padding"])

    @property
    def sha256(self) -> str:
        return str(self.metadata["source"]["sha256"])

    @property
    def imagenet_head_checkpoint(self) -> Path:
        return self.directory / IMAGENET_HEAD_NAME

    @property
    def imagenet_classes(self) -> int:
        return int(self.metadata["imagenet_classes"])

    @property
    def label_offset(self) -> int:
        """Logit index of ImageNet class 0 (1 when logit 0 is 'background')."""
        return int(self.metadata["label_offset"])

    def at_size(self, size: int) -> ImportedWeights:
        """The same weights fed `size` x `size` images (MobileNetV2 is fully convolutional)."""
        if size == self.preprocessing.size:
            return self
        preprocessing = {**self.metadata["preprocessing"], "size": int(size)}
        return replace(self, metadata={**self.metadata, "preprocessing": preprocessing})

    def load_backbone(self, fold_bn: bool = False) -> Any:
        backbone = network.build_backbone(self.padding, batch_norm=True)
        network.load_checkpoint(backbone, self.checkpoint)
        backbone.set_train(False)
        return network.fold_batchnorm(backbone) if fold_bn else backbone

    def load_imagenet_head(self) -> Any:
        head = network.build_head(self.imagenet_classes)
        network.load_checkpoint(head, self.imagenet_head_checkpoint)
        return head

    def load_imagenet_classifier(self, fold_bn: bool = True) -> Any:
        """Backbone + the source model's own ImageNet head: image -> ImageNet logits."""
        classifier = network.build_classifier(self.load_backbone(), self.load_imagenet_head())
        classifier.set_train(False)
        return network.fold_batchnorm(classifier) if fold_bn else classifier


def load_imported(directory: Path) -> ImportedWeights:
    """Open an import directory written by `import_weights`."""
    directory = Path(directory)
    meta_path = directory / METADATA_NAME
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EdgeBuildError(f"no imported weights in {directory}", "run `edge-build weights import` first") from exc
    except (OSError, ValueError) as exc:
        raise EdgeBuildError(f"{meta_path}: unreadable ({exc})", "delete the directory and import again") from exc
    for key in ("source", "padding", "preprocessing", "imagenet_classes", "label_offset"):
        if key not in metadata:
            raise EdgeBuildError(f"{meta_path}: missing key '{key}'", "delete the directory and import again")
    checkpoint = directory / BACKBONE_NAME
    if not checkpoint.is_file():
        raise EdgeBuildError(f"{checkpoint} is missing", "import the weights again")
    return ImportedWeights(directory=directory, checkpoint=checkpoint, metadata=metadata)


def weights_dir(build_dir: Path, sha256: str) -> Path:
    return Path(build_dir) / "weights" / sha256[:16]


def import_weights(tflite_path: Path, build_dir: Path) -> ImportedWeights:
    """Import `tflite_path` into build_dir/weights/<sha256[:16]>/; a second import does no work."""
    tflite_path = Path(tflite_path)
    if not tflite_path.is_file():
        raise EdgeBuildError(f"weights file not found: {tflite_path}", "pass the path of a .tflite file")
    sha256 = sha256_file(tflite_path)
    directory = weights_dir(build_dir, sha256)
    inputs = {"source_sha256": sha256, "importer": IMPORTER_VERSION}

    def produce(out: Path) -> dict[str, Any]:
        metadata = _convert(tflite_path, sha256, out)
        return {"format": metadata["format"], "padding": metadata["padding"]}

    try:
        run_stage(STAGE, directory, inputs, produce)
    except EdgeBuildError:
        clear(directory)  # a file that does not import leaves nothing behind
        raise
    return load_imported(directory)


# --- mapping the TFLite graph onto the network ------------------------------------------


def _fail(graph: TFLiteGraph, layer: WeightLayer, problem: str) -> EdgeBuildError:
    return EdgeBuildError(
        f"{graph.path.name}: op {layer.op_index} ({layer.op}) tensor '{layer.weight_tensor.name}' {problem}; "
        "not a MobileNetV2 1.0 224",
        _HINT,
    )


def _padding_of(graph: TFLiteGraph, layer: WeightLayer, spec: network.ConvSpec) -> str | None:
    """The padding mode a 3x3 conv implies ("tf_same"/"symmetric"), None when it says nothing."""
    if layer.explicit_pad is not None:
        if layer.padding != "VALID":
            raise _fail(graph, layer, f"is padded twice (PAD op, then {layer.padding})")
        for mode in network.PADDING_MODES:
            if network.conv_padding(spec.kernel, spec.stride, mode) == layer.explicit_pad:
                return mode if spec.stride == 2 else None
        raise _fail(graph, layer, f"is fed by a PAD op with (top, bottom, left, right) = {layer.explicit_pad}")
    if spec.kernel == 1:
        return None
    if layer.padding != "SAME":
        raise _fail(graph, layer, f"uses {layer.padding} padding without a PAD op; the network expects SAME")
    return "tf_same" if spec.stride == 2 else None


def _check_layer(graph: TFLiteGraph, layer: WeightLayer, spec: network.ConvSpec) -> None:
    want_op = "DEPTHWISE_CONV_2D" if spec.depthwise else "CONV_2D"
    k = spec.kernel
    want_shape = (1, k, k, spec.out_channels) if spec.depthwise else (spec.out_channels, k, k, spec.in_channels)
    if layer.op != want_op:
        raise _fail(graph, layer, f"is where {spec.path} needs a {want_op}")
    if tuple(layer.weight.shape) != want_shape:
        raise _fail(graph, layer, f"has shape {list(layer.weight.shape)}, {spec.path} needs {list(want_shape)}")
    if layer.bias is None or layer.bias.shape != (spec.out_channels,):
        got = "no bias" if layer.bias is None else f"a bias of shape {list(layer.bias.shape)}"
        raise _fail(graph, layer, f"has {got}, {spec.path} needs ({spec.out_channels},)")
    if layer.stride != spec.stride:
        raise _fail(graph, layer, f"has stride {layer.stride}, {spec.path} needs {spec.stride}")
    want_act = "RELU6" if spec.relu6 else "NONE"
    if layer.activation != want_act:
        raise _fail(graph, layer, f"has activation {layer.activation}, {spec.path} needs {want_act}")


def _ms_weight(layer: WeightLayer, spec: network.ConvSpec) -> np.ndarray:
    if spec.depthwise:  # (1,kh,kw,C) -> (C,1,kh,kw)
        return np.ascontiguousarray(layer.weight[0].transpose(2, 0, 1)[:, None])
    return np.ascontiguousarray(layer.weight.transpose(0, 3, 1, 2))  # OHWI -> OIHW


@dataclass
class _Mapped:
    padding: str
    convs: list[tuple[network.ConvSpec, WeightLayer]]
    head: WeightLayer
    head_weight: np.ndarray  # (classes, 1280)
    head_bias: np.ndarray


def map_graph(graph: TFLiteGraph) -> _Mapped:
    """Check that every weight op fits MobileNetV2 1.0 and pair it with its conv; find the padding."""
    name = graph.path.name
    if graph.input.shape != (1, network.INPUT_SIZE, network.INPUT_SIZE, 3):
        raise EdgeBuildError(
            f"{name}: input tensor '{graph.input.name}' has shape {list(graph.input.shape)}, expected [1, 224, 224, 3]",
            _HINT,
        )
    specs = network.conv_specs()
    if len(graph.layers) < len(specs) + 1:
        raise EdgeBuildError(
            f"{name}: {len(graph.layers)} conv/fully-connected ops, MobileNetV2 1.0 has {len(specs) + 1}", _HINT
        )
    modes: set[str] = set()
    convs = []
    for spec, layer in zip(specs, graph.layers, strict=False):
        _check_layer(graph, layer, spec)
        mode = _padding_of(graph, layer, spec)
        if mode:
            modes.add(mode)
        convs.append((spec, layer))
    if len(modes) != 1:
        raise EdgeBuildError(f"{name}: stride-2 convs mix padding modes {sorted(modes)}", _HINT)
    head = graph.layers[len(specs)]
    extra = graph.layers[len(specs) + 1 :]
    if extra:
        raise _fail(graph, extra[0], "follows the classifier; MobileNetV2 1.0 ends there")
    if head.op == "CONV_2D" and head.weight.ndim == 4 and head.weight.shape[1:] == (1, 1, network.FEATURES):
        head_weight = head.weight.reshape(head.weight.shape[0], network.FEATURES)
    elif head.op == "FULLY_CONNECTED" and head.weight.ndim == 2 and head.weight.shape[1] == network.FEATURES:
        head_weight = head.weight
    else:
        raise _fail(graph, head, f"has shape {list(head.weight.shape)}, the classifier needs (classes, 1280)")
    if head_weight.shape[0] not in (1000, 1001):
        raise _fail(graph, head, f"has {head_weight.shape[0]} classes, ImageNet has 1000 or 1001")
    if head.bias is None or head.bias.shape != (head_weight.shape[0],):
        raise _fail(graph, head, "has no bias of one value per class")
    if graph.count("ADD") != RESIDUAL_ADDS:
        raise EdgeBuildError(f"{name}: {graph.count('ADD')} ADD ops, MobileNetV2 1.0 has {RESIDUAL_ADDS}", _HINT)
    return _Mapped(modes.pop(), convs, head, np.ascontiguousarray(head_weight), head.bias)


def _format_name(mapped: _Mapped) -> tuple[str, str]:
    layer = mapped.convs[0][1]
    quant = layer.quantization
    if quant["dtype"] == "uint8":
        generation, quant_text = "tf1", "uint8 per-tensor"
    elif quant["dtype"] == "int8":
        generation, quant_text = "tf2", "int8 per-channel" if quant.get("per_channel") else "int8 per-tensor"
    else:
        generation, quant_text = "float", quant["dtype"]
    family = "slim" if mapped.head.op == "CONV_2D" else "keras"
    return f"tflite-{generation}-{family}", quant_text


def _set(param: Any, value: np.ndarray) -> None:
    from edge_build.msenv import mindspore_module

    ms = mindspore_module()
    if tuple(param.shape) != tuple(value.shape):
        raise EdgeBuildError(f"internal: {param.name} needs {list(param.shape)}, got {list(value.shape)}")
    param.set_data(ms.Tensor(np.ascontiguousarray(value, dtype=np.float32)))


def _convert(tflite_path: Path, sha256: str, out: Path) -> dict[str, Any]:
    graph = read_tflite(tflite_path)
    mapped = map_graph(graph)
    backbone = network.build_backbone(mapped.padding, batch_norm=True)
    units = dict(backbone.cells_and_names())
    for spec, layer in mapped.convs:
        unit = units[spec.path]
        _set(unit.conv.weight, _ms_weight(layer, spec))
        bn = unit.bn
        channels = spec.out_channels
        _set(bn.gamma, np.ones(channels, np.float32))
        _set(bn.beta, layer.bias)
        _set(bn.moving_mean, np.zeros(channels, np.float32))
        _set(bn.moving_variance, np.full(channels, 1.0 - bn.eps, np.float32))
    network.save_checkpoint(backbone, out / BACKBONE_NAME)

    classes = int(mapped.head_weight.shape[0])
    head = network.build_head(classes)
    _set(head.weight, mapped.head_weight)
    _set(head.bias, mapped.head_bias)
    network.save_checkpoint(head, out / IMAGENET_HEAD_NAME)

    fmt, quant_text = _format_name(mapped)
    q_in = graph.input.quantization
    tflite_input: dict[str, Any] = {
        "name": graph.input.name,
        "dtype": graph.input.dtype.lower(),
        "shape": graph.input.shape,
    }
    if q_in is not None and not q_in.per_channel:
        scale, zero = float(q_in.scale[0]), int(q_in.zero_point[0])
        tflite_input.update(scale=scale, zero_point=zero, real_value=f"(x - {zero}) * {scale!r}")
    metadata = {
        "schema": 1,
        "source": {"file": tflite_path.name, "sha256": sha256, "size": tflite_path.stat().st_size},
        "format": fmt,
        "weight_quantization": quant_text,
        "architecture": "MobileNetV2 1.0 224",
        "padding": mapped.padding,
        "batch_norm": "imported folded: gamma=1, beta=conv bias, moving_mean=0, moving_variance=1-eps",
        "bn_eps": network.BN_EPS,
        "preprocessing": PREPROCESSING.as_dict(),
        "input": {
            "layout": "NCHW",
            "dtype": "float32",
            "shape": [None, 3, network.INPUT_SIZE, network.INPUT_SIZE],
            "channel_order": "RGB",
            "range": [-1.0, 1.0],
        },
        "tflite_input": tflite_input,
        "features": network.FEATURES,
        "imagenet_classes": classes,
        "label_offset": 1 if classes == 1001 else 0,
        "labels": "index 0 is 'background' (imagenet_labels.txt order)" if classes == 1001 else "ImageNet 1000",
        "files": {"backbone": BACKBONE_NAME, "imagenet_head": IMAGENET_HEAD_NAME},
        "source_ops": {"weight_ops": len(graph.layers), "residual_adds": graph.count("ADD"), "total": len(graph.ops)},
    }
    atomic.write_json(out / METADATA_NAME, metadata)
    return metadata
