"""Small MindSpore networks shaped like MobileNetV2 for export/verify tests (not collected).

TF-SAME stride-2 convolutions (one extra row/column at the bottom/right), BatchNorm,
ReLU6, a depthwise conv, an inverted-residual block, a global mean and a dense layer:
every construct whose export can go wrong, at 32x32 so a forward pass takes milliseconds.
"""

from __future__ import annotations

import itertools

import numpy as np

from edge_build.msenv import mindspore_module
from edge_build.preprocessing import Preprocessing

SIZE = 32
NUM_CLASSES = 5
PREPROCESSING = Preprocessing(size=SIZE)


def tiny_classifier(seed: int = 0, batch_norm: bool = True):
    """(N, 3, 32, 32) -> (N, 5) logits, weights drawn from `seed`, in eval mode."""
    ms = mindspore_module()
    nn = ms.nn
    rng = np.random.default_rng(seed)

    def conv(cin: int, cout: int, k: int, stride: int = 1, group: int = 1) -> list:
        if stride == 2:
            pad = {"pad_mode": "pad", "padding": (0, 1, 0, 1)}  # TF SAME: bottom/right only
        else:
            pad = {"pad_mode": "pad", "padding": k // 2} if k > 1 else {"pad_mode": "valid"}
        layer = nn.Conv2d(cin, cout, k, stride=stride, group=group, has_bias=not batch_norm, **pad)
        layer.weight.set_data(
            ms.Tensor(rng.normal(0, (2.0 / (k * k * cin / group)) ** 0.5, layer.weight.shape).astype(np.float32))
        )
        if not batch_norm:
            layer.bias.set_data(ms.Tensor(rng.normal(0, 0.1, (cout,)).astype(np.float32)))
            return [layer]
        bn = nn.BatchNorm2d(cout)
        bn.gamma.set_data(ms.Tensor(rng.uniform(0.5, 1.5, cout).astype(np.float32)))
        bn.beta.set_data(ms.Tensor(rng.normal(0, 0.1, cout).astype(np.float32)))
        bn.moving_mean.set_data(ms.Tensor(rng.normal(0, 0.1, cout).astype(np.float32)))
        bn.moving_variance.set_data(ms.Tensor(rng.uniform(0.5, 1.5, cout).astype(np.float32)))
        return [layer, bn]

    class Residual(nn.Cell):
        def __init__(self, channels: int) -> None:
            super().__init__()
            hidden = channels * 4
            self.block = nn.SequentialCell(
                [
                    *conv(channels, hidden, 1),
                    nn.ReLU6(),
                    *conv(hidden, hidden, 3, group=hidden),
                    nn.ReLU6(),
                    *conv(hidden, channels, 1),
                ]
            )

        def construct(self, x):
            return x + self.block(x)

    class Tiny(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.SequentialCell(
                [
                    nn.SequentialCell([*conv(3, 8, 3, stride=2), nn.ReLU6()]),
                    nn.SequentialCell([*conv(8, 8, 3, stride=2, group=8), nn.ReLU6(), *conv(8, 16, 1)]),
                    Residual(16),
                    nn.SequentialCell([*conv(16, 16, 3, stride=2, group=16), nn.ReLU6(), *conv(16, 32, 1), nn.ReLU6()]),
                ]
            )
            self.mean = ms.ops.ReduceMean(keep_dims=False)
            self.dense = nn.Dense(32, NUM_CLASSES)
            self.dense.weight.set_data(ms.Tensor(rng.normal(0, 0.3, (NUM_CLASSES, 32)).astype(np.float32)))
            self.dense.bias.set_data(ms.Tensor(rng.normal(0, 0.1, NUM_CLASSES).astype(np.float32)))

        def construct(self, x):
            return self.dense(self.mean(self.stages(x), (2, 3)))

    net = Tiny()
    net.set_train(False)
    return net


def folded(net, seed: int = 0):
    """The BatchNorm-free twin of `tiny_classifier(seed, batch_norm=True)`: BN folded into the convs.

    MindSpore's ONNX exporter is unreliable on BatchNorm (a second export of the same cell
    crashes), so like the real network the exported one is always the folded form.
    """
    ms = mindspore_module()
    nn = ms.nn
    twin = tiny_classifier(seed, batch_norm=False)
    cells = [c for _, c in net.cells_and_names() if isinstance(c, (nn.Conv2d, nn.BatchNorm2d))]
    pairs = [(conv, bn) for conv, bn in itertools.pairwise(cells) if isinstance(bn, nn.BatchNorm2d)]
    targets = [c for _, c in twin.cells_and_names() if isinstance(c, nn.Conv2d)]
    for (conv, bn), target in zip(pairs, targets, strict=True):
        factor = bn.gamma.asnumpy() / np.sqrt(bn.moving_variance.asnumpy() + bn.eps)
        target.weight.set_data(ms.Tensor(conv.weight.asnumpy() * factor[:, None, None, None]))
        target.bias.set_data(ms.Tensor(bn.beta.asnumpy() - bn.moving_mean.asnumpy() * factor))
    twin.dense.weight.set_data(net.dense.weight.data.copy())
    twin.dense.bias.set_data(net.dense.bias.data.copy())
    return twin


def random_images(count: int, seed: int = 1) -> np.ndarray:
    """(count, 32, 32, 3) uint8 RGB with some structure (gradients plus noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    base = ramp[None, :, None] * rng.uniform(0, 1, (count, 1, 1, 1, 3)).reshape(count, 1, 1, 3) + ramp[:, None, None]
    noisy = base / 2 + rng.normal(0, 30, (count, SIZE, SIZE, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def forward(net, pixels: np.ndarray) -> np.ndarray:
    ms = mindspore_module()
    return net(ms.Tensor(PREPROCESSING.normalize(pixels))).asnumpy()
