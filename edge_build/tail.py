"""The trainable top of the backbone: stages[start:] + pooling + head, trained on cached feature maps.

`fit_tail` trains it in MindSpore (GRAPH_MODE, momentum SGD, a per-step learning rate),
`tail_logits` runs it, `bn_form_classifier` turns the result into the whole classifier in
the BatchNorm form of the imported weights, the form every `network.ckpt` has.

The tail runs with BatchNorm folded into its convs and trains their weights and biases:
the imported weights have BN folded already (gamma 1, mean 0, variance 1 - eps), so this
is the network with frozen BN statistics. Batch statistics instead would change its
function at step 0 (measured: training-image accuracy of the head-only network 100 % ->
3 % with BN in training mode in the last 2 stages, batches of 32), and the BN kernels cost
time (a K=2 step at batch 32: 0.62 s with BN in inference mode, 0.37 s folded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import network, taxonomy
from edge_build.errors import EdgeBuildError
from edge_build.schedules import build_lr

if TYPE_CHECKING:
    from edge_build.finetune import FinetuneOptions
    from edge_build.weights import ImportedWeights

EVAL_BATCH = 64


def tail_parameters(folded_backbone: Any, start: int) -> dict[str, np.ndarray]:
    """Name -> value of the parameters of stages[start:] of a BN-folded backbone."""
    return {
        param.name: param.asnumpy().astype(np.float32).copy()
        for index in range(start, network.NUM_STAGES)
        for param in folded_backbone.stages[index].get_parameters()
    }


def initial_values(
    folded_backbone: Any, start: int, head_weight: np.ndarray, head_bias: np.ndarray
) -> dict[str, np.ndarray]:
    """Starting point of a fine-tune: the pretrained stages[start:] (folded) and a trained head."""
    values = tail_parameters(folded_backbone, start)
    values["head.weight"] = np.asarray(head_weight, dtype=np.float32)
    values["head.bias"] = np.asarray(head_bias, dtype=np.float32)
    return values


def _tail_cell(padding: str, start: int, values: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """(N, C, H, W) map entering stages[start] -> logits; the cell and its trainable parameters."""
    ms = network._cells().ms
    nn, ops = ms.nn, ms.ops

    class Tail(nn.Cell):
        def __init__(self, backbone: Any, head: Any) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self.start = start
            self.pool = ops.ReduceMean(keep_dims=False)

        def construct(self, x):
            return self.head(self.pool(self.backbone.forward_stages(x, self.start), (2, 3)))

    backbone = network.build_backbone(padding, batch_norm=False)
    head = network.build_head(taxonomy.NUM_CLASSES)
    tail = Tail(backbone, head)
    for param in backbone.get_parameters():
        param.requires_grad = False
    trainable = [p for i in range(start, network.NUM_STAGES) for p in backbone.stages[i].get_parameters()]
    trainable += list(head.get_parameters())
    for param in trainable:
        if param.name not in values:
            raise EdgeBuildError(f"internal: no initial value for {param.name}")
        param.set_data(ms.Tensor(np.ascontiguousarray(values[param.name], dtype=np.float32)))
        param.requires_grad = True
    return tail, trainable


def steps_per_epoch(samples: int, batch_size: int) -> int:
    """Full batches per pass over the views (the last partial batch is dropped: one compiled shape)."""
    return max(1, samples // max(1, min(batch_size, samples)))


def learning_rates(options: FinetuneOptions, samples: int) -> list[float]:
    """One rate per step: linear warm-up over the first `warmup` fraction, then the schedule."""
    steps = steps_per_epoch(samples, options.batch_size) * options.epochs
    return build_lr(steps, options.lr, options.lr_schedule, warmup_steps=int(options.warmup * steps))


def fit_tail(
    maps: np.ndarray,
    labels: np.ndarray,
    initial: dict[str, np.ndarray],
    padding: str,
    options: FinetuneOptions,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train stages[options.start:] and the head on cached maps (N, V, C, H, W); trained values and history.

    `initial` holds the starting value of every trainable parameter (BN-folded stage
    parameters by their `backbone.stages.*` names, `head.weight` and `head.bias`). Every
    view is a sample; the order comes from a NumPy generator seeded with `options.seed`.
    """
    from edge_build.training import epoch_orders, graph_mode

    images, views = maps.shape[:2]
    samples = images * views
    batch = min(options.batch_size, samples)
    per_epoch = steps_per_epoch(samples, batch)
    rates = learning_rates(options, samples)
    flat = maps.reshape(samples, *maps.shape[2:])
    flat_labels = np.repeat(np.asarray(labels, dtype=np.int32), views)
    with graph_mode() as ms:
        ms.set_seed(options.seed)
        nn = ms.nn
        tail, trainable = _tail_cell(padding, options.start, initial)
        decayed = [p for p in trainable if p.name.endswith("weight")]
        plain = [p for p in trainable if not p.name.endswith("weight")]
        optimizer = nn.Momentum(
            [{"params": decayed, "weight_decay": options.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            learning_rate=ms.Tensor(np.asarray(rates, dtype=np.float32)),
            momentum=options.momentum,
        )
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        step = nn.TrainOneStepCell(nn.WithLossCell(tail, loss_fn), optimizer)
        step.set_train()
        epoch_loss = []
        for order in epoch_orders(samples, options.epochs, options.seed):
            total = 0.0
            for s in range(per_epoch):
                chosen = np.sort(order[s * batch : (s + 1) * batch])  # sorted: a cache-friendly gather
                loss = step(ms.Tensor(flat[chosen].astype(np.float32)), ms.Tensor(flat_labels[chosen]))
                total += float(loss.asnumpy())
                if on_step:
                    on_step(1)
            epoch_loss.append(total / per_epoch)
        values = {p.name: p.asnumpy().astype(np.float32).copy() for p in trainable}
    if not all(np.all(np.isfinite(v)) for v in values.values()):
        raise EdgeBuildError(
            f"fine-tuning diverged (loss {epoch_loss[-1]:.3g}) with lr {options.lr:g}", "lower --finetune-lr"
        )
    return {"values": values, "epoch_loss": epoch_loss, "learning_rates": rates, "steps_per_epoch": per_epoch}


def tail_logits(maps: np.ndarray, values: dict[str, np.ndarray], padding: str, start: int) -> np.ndarray:
    """Logits of the tail with `values` on maps (N, C, H, W): inference, PyNative, a fresh cell."""
    ms = network._cells().ms
    tail, _ = _tail_cell(padding, start, values)
    tail.set_train(False)
    out = [
        tail(ms.Tensor(np.asarray(maps[i : i + EVAL_BATCH], dtype=np.float32))).asnumpy()
        for i in range(0, len(maps), EVAL_BATCH)
    ]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, taxonomy.NUM_CLASSES), np.float32)


def bn_form_classifier(weights: ImportedWeights, values: dict[str, np.ndarray]) -> Any:
    """The whole classifier in the imported BatchNorm form, the stages and head in `values` replaced.

    A trained folded conv (weight W, bias b) becomes conv weight W with gamma 1, beta b,
    moving mean 0, moving variance 1 - eps: what the importer writes, and what
    `fold_batchnorm` turns back into (W, b) exactly (1 / sqrt(1 - eps + eps) == 1 in float32).
    """
    ms = network._cells().ms
    backbone = weights.load_backbone(fold_bn=False)
    units = dict(backbone.cells_and_names())
    for name, value in values.items():
        if not name.startswith("backbone."):
            continue
        path, kind = name[len("backbone.") :].rsplit(".conv.", 1)
        unit = units[path]
        if kind == "weight":
            unit.conv.weight.set_data(ms.Tensor(value))
            continue
        channels = value.shape[0]
        unit.bn.gamma.set_data(ms.Tensor(np.ones(channels, np.float32)))
        unit.bn.beta.set_data(ms.Tensor(value))
        unit.bn.moving_mean.set_data(ms.Tensor(np.zeros(channels, np.float32)))
        unit.bn.moving_variance.set_data(ms.Tensor(np.full(channels, 1.0 - unit.bn.eps, np.float32)))
    head = network.build_head(taxonomy.NUM_CLASSES)
    head.weight.set_data(ms.Tensor(values["head.weight"]))
    head.bias.set_data(ms.Tensor(values["head.bias"]))
    classifier = network.build_classifier(backbone, head)
    classifier.set_train(False)
    return classifier
