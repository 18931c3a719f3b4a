"""MobileNetV2 1.0 (Sandler et al. 2018) in MindSpore: backbone, head, classifier.

The backbone is the paper's network: a 3x3 stem conv, 17 inverted-residual blocks
(expand 1x1, depthwise 3x3, linear project 1x1, residual when shapes allow), a 1x1
conv to 1280 channels, each conv followed by BatchNorm (and ReLU6 except on the
projections), then global average pooling. `backbone.stages` holds the 19 stages in
order. Do not slice it (`stages[:k]` builds a new SequentialCell that renames the
parameters to `0.`, `1.`...): use `backbone.forward_stages(x, start, stop)` and
`freeze_stages(backbone, k)`.

Padding of the stride-2 3x3 convs is a property of the weights (`PADDING_MODES`):
"tf_same" reproduces TensorFlow's SAME padding on even input sizes (the extra row and
column go at the bottom/right: pads top=0, bottom=1, left=0, right=1); "symmetric" pads
one on every side. Stride-1 3x3 convs pad one on every side in both modes. The padding
stays inside Conv2d (pad_mode="pad"), not a separate Pad op.

Parameter names: a backbone's are `backbone.stages.<i>...`, a head's are `head.weight`
and `head.bias`, standalone or inside a classifier, so backbone, head and classifier
checkpoints are interchangeable by name (`load_checkpoint(classifier.backbone, path)`).

MindSpore is imported lazily: the Cell classes are created on first use by `_cells()`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from edge_build.atomic import atomic_path
from edge_build.errors import EdgeBuildError
from edge_build.msenv import jit_inference, mindspore_module

PADDING_MODES = ("tf_same", "symmetric")

FEATURES = 1280
INPUT_SIZE = 224
BN_EPS = 1e-3  # TensorFlow's MobileNetV2 BatchNorm epsilon
BN_MOMENTUM = 0.997  # MindSpore's momentum is the weight of the old moving statistics (TF decay 0.997)

#: (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
NUM_STAGES = 1 + sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTINGS) + 1  # 19
#: InferenceForward compiles once an input shape has carried this many images
COMPILE_AFTER_IMAGES = 32
_COMPILED_MARK = "_edge_build_compiled_copy"


@dataclass(frozen=True)
class ConvSpec:
    """One conv of the backbone, in graph order (what the weights importer maps onto)."""

    path: str  # cell path inside the backbone, e.g. "stages.3.depthwise"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    depthwise: bool
    relu6: bool


@dataclass(frozen=True)
class BlockSpec:
    in_channels: int
    out_channels: int
    stride: int
    expansion: int

    @property
    def hidden(self) -> int:
        return self.in_channels * self.expansion

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_specs() -> list[BlockSpec]:
    """The 17 inverted-residual blocks, in order."""
    blocks, channels = [], STEM_CHANNELS
    for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
        for i in range(n):
            blocks.append(BlockSpec(channels, c, s if i == 0 else 1, t))
            channels = c
    return blocks


def conv_specs() -> list[ConvSpec]:
    """The 52 convs of the backbone in graph order (stem, blocks, final 1x1 conv)."""
    specs = [ConvSpec("stages.0", 3, STEM_CHANNELS, 3, 2, False, True)]
    for index, block in enumerate(block_specs(), start=1):
        prefix = f"stages.{index}"
        if block.expansion != 1:
            specs.append(ConvSpec(f"{prefix}.expand", block.in_channels, block.hidden, 1, 1, False, True))
        specs.append(ConvSpec(f"{prefix}.depthwise", block.hidden, block.hidden, 3, block.stride, True, True))
        specs.append(ConvSpec(f"{prefix}.project", block.hidden, block.out_channels, 1, 1, False, False))
    last = block_specs()[-1].out_channels
    specs.append(ConvSpec(f"stages.{NUM_STAGES - 1}", last, FEATURES, 1, 1, False, True))
    return specs


def _check_padding(padding: str) -> str:
    if padding not in PADDING_MODES:
        raise EdgeBuildError(f"unknown padding mode {padding!r}", f"allowed: {', '.join(PADDING_MODES)}")
    return padding


def conv_padding(kernel: int, stride: int, padding: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of a conv, for even input sizes."""
    if kernel == 1:
        return (0, 0, 0, 0)
    half = (kernel - 1) // 2
    if stride == 2 and padding == "tf_same":
        # TF SAME on an even size pads kernel - stride = 1 in total, the odd pixel at the end.
        return (half - 1, half, half - 1, half)
    return (half, half, half, half)


@functools.cache
def _cells() -> SimpleNamespace:
    """Create the Cell classes (MindSpore is imported here, not at module import)."""
    ms = mindspore_module()
    nn, ops = ms.nn, ms.ops

    class ConvBNAct(nn.Cell):
        """Conv2d (+ BatchNorm) (+ ReLU6). Without BatchNorm the conv carries a bias."""

        def __init__(self, spec: ConvSpec, padding: str, batch_norm: bool) -> None:
            super().__init__()
            pads = conv_padding(spec.kernel, spec.stride, padding)
            self.spec = spec
            self.batch_norm = batch_norm
            self.relu6 = spec.relu6
            self.conv = nn.Conv2d(
                spec.in_channels,
                spec.out_channels,
                spec.kernel,
                stride=spec.stride,
                pad_mode="pad" if any(pads) else "valid",
                padding=pads if any(pads) else 0,
                group=spec.in_channels if spec.depthwise else 1,
                has_bias=not batch_norm,
            )
            if batch_norm:
                self.bn = nn.BatchNorm2d(spec.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
            if spec.relu6:
                self.act = nn.ReLU6()

        def construct(self, x):
            x = self.conv(x)
            if self.batch_norm:
                x = self.bn(x)
            if self.relu6:
                x = self.act(x)
            return x

    class InvertedResidual(nn.Cell):
        def __init__(self, convs: list[ConvSpec], residual: bool, padding: str, batch_norm: bool) -> None:
            super().__init__()
            self.residual = residual
            self.has_expand = len(convs) == 3
            if self.has_expand:
                self.expand = ConvBNAct(convs[0], padding, batch_norm)
            self.depthwise = ConvBNAct(convs[-2], padding, batch_norm)
            self.project = ConvBNAct(convs[-1], padding, batch_norm)

        def construct(self, x):
            y = self.expand(x) if self.has_expand else x
            y = self.project(self.depthwise(y))
            if self.residual:
                return x + y
            return y

    class Backbone(nn.Cell):
        """(N,3,224,224) float32 NCHW -> (N,1280) globally average-pooled features."""

        def __init__(self, padding: str, batch_norm: bool) -> None:
            super().__init__()
            self.padding = padding
            self.batch_norm = batch_norm
            specs = conv_specs()
            stages = [ConvBNAct(specs[0], padding, batch_norm)]
            position = 1
            for block in block_specs():
                count = 3 if block.expansion != 1 else 2
                stages.append(InvertedResidual(specs[position : position + count], block.residual, padding, batch_norm))
                position += count
            stages.append(ConvBNAct(specs[position], padding, batch_norm))
            self.stages = nn.SequentialCell(stages)
            self.pool = ops.ReduceMean(keep_dims=False)

        def construct(self, x):
            return self.pool(self.stages(x), (2, 3))

        def feature_map(self, x):
            """(N,3,224,224) -> (N,1280,7,7), before pooling (always PyNative)."""
            return self.stages(x)

        def forward_stages(self, x, start: int = 0, stop: int | None = None):
            """Run stages[start:stop] without slicing the SequentialCell (slicing renames parameters)."""
            for index in range(start, NUM_STAGES if stop is None else stop):
                x = self.stages[index](x)
            return x

        def pooled(self, feature_map):
            return self.pool(feature_map, (2, 3))

    class Classifier(nn.Cell):
        def __init__(self, backbone: Backbone, head: Any, softmax: bool) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.softmax = softmax
            self.probabilities = nn.Softmax(axis=-1)

        def construct(self, x):
            logits = self.head(self.backbone(x))
            if self.softmax:
                return self.probabilities(logits)
            return logits

    return SimpleNamespace(ms=ms, ConvBNAct=ConvBNAct, Backbone=Backbone, Classifier=Classifier, Dense=nn.Dense)


def build_backbone(padding: str = "tf_same", batch_norm: bool = True) -> Any:
    """A MobileNetV2 1.0 backbone, parameters named `backbone.*` (weights random until loaded)."""
    backbone = _cells().Backbone(_check_padding(padding), batch_norm)
    backbone.update_parameters_name("backbone.")
    return backbone


def build_head(num_classes: int = 26) -> Any:
    """nn.Dense(1280, num_classes), parameters `head.weight` (num_classes,1280) and `head.bias`."""
    if num_classes < 1:
        raise EdgeBuildError(f"a head needs at least one class, got {num_classes}")
    head = _cells().Dense(FEATURES, num_classes)
    head.update_parameters_name("head.")
    return head


def build_classifier(backbone: Any, head: Any, softmax: bool = False) -> Any:
    """image -> logits (or probabilities when `softmax`); parameters `backbone.*` and `head.*`."""
    return _cells().Classifier(backbone, head, softmax)


def freeze_stages(backbone: Any, count: int) -> None:
    """Make the first `count` stages untrainable (requires_grad=False) and the rest trainable.

    The BatchNorm layers of frozen stages should also run in inference mode
    (`backbone.stages[i].set_train(False)` after the classifier's `set_train(True)`).
    """
    if not 0 <= count <= NUM_STAGES:
        raise EdgeBuildError(f"cannot freeze {count} stages: the backbone has {NUM_STAGES}")
    for index in range(NUM_STAGES):
        for param in backbone.stages[index].get_parameters():
            if "moving_" not in param.name:
                param.requires_grad = index >= count


def _numpy(param: Any) -> np.ndarray:
    return param.asnumpy().astype(np.float32)


def _conv_units(cell: Any) -> list[Any]:
    convbnact = _cells().ConvBNAct
    return [unit for _, unit in cell.cells_and_names() if isinstance(unit, convbnact)]


def _fold_backbone(backbone: Any) -> Any:
    ms = _cells().ms
    if not backbone.batch_norm:
        return _twin(backbone)
    folded = build_backbone(backbone.padding, batch_norm=False)
    for source, target in zip(_conv_units(backbone), _conv_units(folded), strict=True):
        bn = source.bn
        scale = _numpy(bn.gamma) / np.sqrt(_numpy(bn.moving_variance) + np.float32(bn.eps))
        weight = _numpy(source.conv.weight) * scale.reshape(-1, 1, 1, 1)
        bias = _numpy(bn.beta) - _numpy(bn.moving_mean) * scale
        target.conv.weight.set_data(ms.Tensor(weight.astype(np.float32)))
        target.conv.bias.set_data(ms.Tensor(bias.astype(np.float32)))
    return folded


def _twin(cell: Any) -> Any:
    """An unmarked copy of a folded backbone or classifier (same weights, fresh cell objects)."""
    ms = _cells().ms
    if isinstance(cell, _cells().Classifier):
        copy = build_classifier(_twin(cell.backbone), _copy_head(cell.head), cell.softmax)
    else:
        copy = build_backbone(cell.padding, batch_norm=cell.batch_norm)
        for target, source in zip(copy.get_parameters(), cell.get_parameters(), strict=True):
            target.set_data(ms.Tensor(_numpy(source)))
    copy.set_train(False)
    return copy


def _copy_head(head: Any) -> Any:
    ms = _cells().ms
    copy = build_head(int(head.weight.shape[0]))
    copy.weight.set_data(ms.Tensor(_numpy(head.weight)))
    copy.bias.set_data(ms.Tensor(_numpy(head.bias)))
    return copy


def fold_batchnorm(cell: Any) -> Any:
    """An equivalent inference cell without BatchNorm (BN folded into conv weights and biases).

    Works on a backbone or a classifier; the input cell is left unchanged. The result is
    for inference only: its parameters do not require gradients.
    """
    cells = _cells()
    if isinstance(cell, cells.Backbone):
        folded = _fold_backbone(cell)
    elif isinstance(cell, cells.Classifier):
        folded = cells.Classifier(_fold_backbone(cell.backbone), _copy_head(cell.head), cell.softmax)
    else:
        raise EdgeBuildError(f"fold_batchnorm expects a MobileNetV2 backbone or classifier, got {type(cell).__name__}")
    folded.set_train(False)
    for param in folded.get_parameters():
        param.requires_grad = False
    return folded


class InferenceForward:
    """A cell's forward pass for bulk inference: PyNative first, then a compiled graph.

    PyNative runs op by op; `mindspore.jit` compiles the forward pass (about 1-2 s per input
    shape) and then runs it several times faster on this CPU (benchmarks/mindspore_speed.py).
    An input shape is compiled once it has carried `compile_after_images` images, so one-off
    calls never pay for compiling.

    Only inference cells are compiled: this module's backbone/classifier without BatchNorm and
    with no parameter requiring gradients (what `fold_batchnorm` returns). Others may change between
    calls, and in MindSpore 2.7 a compiled graph follows neither `set_train()` nor `set_data()`
    on its cell (graphs are cached per cell object), so they stay PyNative. The graph is compiled
    from a private copy (`_twin`), never from the caller's cell. After compiling, the cell is
    marked and `load_checkpoint` refuses it (the copy would go stale).
    """

    def __init__(self, cell: Any, compile_after_images: int = COMPILE_AFTER_IMAGES, enabled: bool | None = None):
        self.cell = cell
        self.compile_after_images = compile_after_images
        cells = _cells()
        backbone = cell.backbone if isinstance(cell, cells.Classifier) else cell
        inference_only = (
            isinstance(backbone, cells.Backbone)
            and not backbone.batch_norm
            and not any(param.requires_grad for param in cell.get_parameters())
        )
        self.enabled = inference_only and (jit_inference() if enabled is None else enabled)
        self.images: dict[tuple[int, ...], int] = {}
        self.compiled: Any = None

    def __call__(self, x: Any) -> Any:
        self.cell.set_train(False)
        if self.enabled:
            shape = tuple(x.shape)
            self.images[shape] = self.images.get(shape, 0) + int(shape[0])
            if self.images[shape] >= self.compile_after_images:
                if self.compiled is None:
                    self.compiled = _cells().ms.jit(_twin(self.cell).construct)
                    object.__setattr__(self.cell, _COMPILED_MARK, True)
                return self.compiled(x)
        return self.cell(x)


def inference_forward(cell: Any, enabled: bool | None = None) -> InferenceForward:
    """`cell`'s forward pass for bulk inference (see InferenceForward); EDGE_BUILD_MS_JIT=0: PyNative only."""
    return InferenceForward(cell, enabled=enabled)


def save_checkpoint(cell: Any, path: str | Path) -> Path:
    """Write every parameter of `cell` (BatchNorm statistics included) to a MindSpore checkpoint."""
    ms = mindspore_module()
    path = Path(path)
    with atomic_path(path) as tmp:
        written = Path(f"{tmp}.ckpt")  # MindSpore appends ".ckpt" to a name that does not end with it
        try:
            ms.save_checkpoint(cell, str(tmp))
            if written.exists():
                written.replace(tmp)
            # MindSpore makes the file read-only (0400); the atomic helper reopens it to fsync.
            tmp.chmod(0o644)
        finally:
            written.unlink(missing_ok=True)
    return path


def _mismatch_hint(name: str, stored: dict[str, Any]) -> str:
    if name.endswith(".conv.bias") and any(key.endswith(".bn.gamma") for key in stored):
        return "the checkpoint holds the BatchNorm form: build with batch_norm=True, then fold_batchnorm()"
    if ".bn." in name and any(key.endswith(".conv.bias") for key in stored):
        return "the checkpoint holds the folded form: build with batch_norm=False"
    return "the checkpoint was written for another network; rebuild it"


def load_checkpoint(cell: Any, path: str | Path) -> None:
    """Load every parameter of `cell` from `path` (extra parameters in the file are ignored).

    Raises EdgeBuildError naming the file and the parameter on a missing, unreadable
    or mismatched checkpoint.
    """
    ms = mindspore_module()
    path = Path(path)
    if cell.__dict__.get(_COMPILED_MARK):
        raise EdgeBuildError(
            f"cannot load {path.name} into an inference cell that already runs compiled (it would keep old weights)",
            "load into a fresh build_backbone()/build_classifier() network, then fold_batchnorm()",
        )
    if not path.is_file():
        raise EdgeBuildError(f"checkpoint not found: {path}", "run `edge-build weights import` or train first")
    try:
        stored = ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError variants for damaged files
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise EdgeBuildError(
            f"{path}: not a readable MindSpore checkpoint ({first_line})",
            "the file is truncated or corrupt; rebuild it",
        ) from exc
    wanted = {}
    for param in cell.get_parameters():
        if param.name not in stored:
            raise EdgeBuildError(
                f"{path.name}: parameter {param.name} is missing from the checkpoint",
                _mismatch_hint(param.name, stored),
            )
        value = stored[param.name]
        if tuple(value.shape) != tuple(param.shape):
            raise EdgeBuildError(
                f"{path.name}: parameter {param.name} has shape {list(value.shape)} in the checkpoint, "
                f"the network needs {list(param.shape)}",
                _mismatch_hint(param.name, stored),
            )
        wanted[param.name] = value
    not_loaded, _ = ms.load_param_into_net(cell, wanted, strict_load=True)
    if not_loaded:
        raise EdgeBuildError(f"{path.name}: parameter {not_loaded[0]} was not loaded", "rebuild the checkpoint")
