"""Stage `eval`: the trained network on the validation split, and only there.

The MindSpore network itself (checkpoint from `edge-build train`, BatchNorm folded) runs
on the validation images, decoded and preprocessed like everywhere else. Reported:
top-1, top-5, per-class accuracy, the confusion matrix, and the accuracy of the 4-bin
decision. Validation images that also occur in the training split (same bytes, same
decoded pixels, or a near-duplicate by the doctor's perceptual-hash rule) are listed,
and every metric is repeated without them. As a consistency check, the cached features
through the trained head must give the same top-1 as the network.

Output: build/eval/eval.json (schema-versioned) and build/eval/confusion.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import atomic, plots, taxonomy
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.features import FeatureSet
    from edge_build.trained import TrainedModel

STAGE = "eval"
SPLIT = "val"
SCHEMA = 1
EVAL_NAME = "eval.json"
EVALUATOR_VERSION = 1
BATCH_SIZE = 32


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy figures of `logits` (N, 26) against `labels` (N,)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    classes = taxonomy.NUM_CLASSES
    if n == 0:
        return {"n": 0, "top1": None, "top5": None, "bin_accuracy": None, "correct": 0}
    predicted = logits.argmax(axis=1)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    bins = np.array([taxonomy.bin_index(i) for i in range(classes)])
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    bin_confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(bin_confusion, (bins[labels], bins[predicted]), 1)
    per_class = []
    for cls in taxonomy.CLASSES:
        mask = labels == cls.index
        total = int(mask.sum())
        correct = int((predicted[mask] == cls.index).sum())
        per_class.append(
            {
                "index": cls.index,
                "code": cls.code,
                "english": cls.english,
                "chinese": cls.chinese,
                "n": total,
                "correct": correct,
                "accuracy": correct / total if total else None,
            }
        )
    return {
        "n": n,
        "correct": int((predicted == labels).sum()),
        "top1": float((predicted == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()),
        "bin_accuracy": float((bins[predicted] == bins[labels]).mean()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "bin_confusion": bin_confusion.tolist(),
        "bins": [taxonomy.BINS[code].english for code in sorted(taxonomy.BINS)],
    }


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("n", "correct", "top1", "top5", "bin_accuracy")}


def leakage(features: FeatureSet, split: str = SPLIT) -> dict[str, Any]:
    """Which images of `split` also occur in training: same file, same pixels, or near-duplicate."""
    from edge_build.folds import near_duplicate_of

    held, train = features[split], features["train"]
    train_files, train_pixels = set(train.sha256), set(train.pixel_sha256)
    same_file = np.array([sha in train_files for sha in held.sha256], dtype=bool)
    same_pixels = np.array([sha in train_pixels for sha in held.pixel_sha256], dtype=bool) & ~same_file
    near = near_duplicate_of(held.phash, held.dhash, train.phash, train.dhash) & ~same_file & ~same_pixels
    return {
        "method": "file sha256; sha256 of the decoded RGB pixels; pHash and dHash within the doctor's bounds",
        "same_file": [k for k, hit in zip(held.keys, same_file, strict=True) if hit],
        "same_pixels": [k for k, hit in zip(held.keys, same_pixels, strict=True) if hit],
        "near_duplicate": [k for k, hit in zip(held.keys, near, strict=True) if hit],
        "_exact": same_file | same_pixels,
        "_any": same_file | same_pixels | near,
    }


def _network_logits(trained: TrainedModel, paths: Sequence[Path], progress: bool) -> np.ndarray:
    import sys

    from tqdm import tqdm

    from edge_build.msenv import mindspore_module
    from edge_build.runners import MindSporeRunner
    from edge_build.training import cap_cpu_threads

    cap_cpu_threads(mindspore_module())
    runner = MindSporeRunner(trained.network(fold_bn=True, softmax=False))
    pre = trained.preprocessing
    chunks = []
    bar = tqdm(
        total=len(paths),
        desc="eval",
        unit="img",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
        leave=False,
    )
    try:
        for start in range(0, len(paths), BATCH_SIZE):
            batch = paths[start : start + BATCH_SIZE]
            chunks.append(runner.run(pre.prepare_batch(batch)))
            bar.update(len(batch))
    finally:
        bar.close()
    return np.concatenate(chunks).astype(np.float32)


def _head_arrays(trained: TrainedModel) -> tuple[np.ndarray, np.ndarray]:
    from edge_build import network

    head = network.build_head(trained.num_classes)
    network.load_checkpoint(head, trained.head_checkpoint)
    return head.weight.asnumpy(), head.bias.asnumpy()


def evaluate(
    features: FeatureSet,
    data_root: Path,
    build_dir: Path,
    trained: TrainedModel | None = None,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the trained network on the validation split; the eval.json payload."""
    import json

    from edge_build.trained import load_trained

    log = log or (lambda message: None)
    trained = trained or load_trained(build_dir)
    held = features[SPLIT]
    if len(held) == 0:
        raise EdgeBuildError("the validation split is empty", "put images in <data>/val/<class>/")
    directory = Path(build_dir) / "eval"
    inputs = {
        "network_sha256": sha256_file(trained.checkpoint),
        "head_sha256": sha256_file(trained.head_checkpoint),
        "split": SPLIT,
        "images": [[key, sha] for key, sha in zip(held.keys, held.sha256, strict=True)],
        "train_features_sha256": features.content_hash("train"),
        "evaluator": EVALUATOR_VERSION,
    }

    def produce(out: Path) -> dict[str, Any]:
        started = time.perf_counter()
        paths = [Path(data_root) / key for key in held.keys]
        if any(not key.startswith(f"{SPLIT}/") for key in held.keys):
            raise EdgeBuildError("internal: evaluation was handed images outside the validation split")
        logits = _network_logits(trained, paths, progress)
        labels = np.asarray(held.labels, dtype=np.int64)
        weight, bias = _head_arrays(trained)
        feature_logits = held.features @ weight.T + bias
        agreement = float((feature_logits.argmax(1) == logits.argmax(1)).mean())
        leaks = leakage(features)
        exact, any_dup = leaks.pop("_exact"), leaks.pop("_any")
        full = metrics(logits, labels)
        subsets = {
            "all": _summary(full),
            "without_exact_duplicates": _summary(metrics(logits[~exact], labels[~exact])),
            "without_any_duplicates": _summary(metrics(logits[~any_dup], labels[~any_dup])),
        }
        warnings = []
        if any_dup.any():
            warnings.append(
                f"{int(any_dup.sum())} of {len(held)} validation images also occur in the training split "
                f"({len(leaks['same_file'])} same file, {len(leaks['same_pixels'])} same pixels, "
                f"{len(leaks['near_duplicate'])} near-duplicates); `edge-build doctor` lists them"
            )
        # A fine-tuned backbone (`train --finetune`) no longer produces the cached frozen features.
        if agreement < 1.0 and not ((getattr(trained, "metadata", None) or {}).get("finetune") or {}).get("blocks"):
            warnings.append(
                f"cached features + head agree with the network on only {agreement:.1%} of the top-1 answers"
            )
        probabilities = _softmax(logits)
        predicted = logits.argmax(axis=1)
        leak_kind = {key: kind for kind in ("same_file", "same_pixels", "near_duplicate") for key in leaks[kind]}
        predictions = [
            {
                "key": key,
                "true": taxonomy.CLASSES[int(true)].code,
                "predicted": taxonomy.CLASSES[int(pred)].code,
                "probability": round(float(probabilities[i, pred]), 6),
                "correct": bool(pred == true),
                "leak": leak_kind.get(key),
            }
            for i, (key, true, pred) in enumerate(zip(held.keys, labels, predicted, strict=True))
        ]
        plots.plot_confusion(
            np.asarray(full["confusion"]),
            list(taxonomy.CODES),
            out / "confusion.png",
            title=f"validation confusion matrix: top-1 {full['top1']:.1%} ({full['correct']}/{full['n']})",
        )
        result = {
            "schema": SCHEMA,
            "split": SPLIT,
            "runtime": "mindspore (network checkpoint, BatchNorm folded)",
            "model": trained.summary(),
            **full,
            "subsets": subsets,
            "leakage": leaks,
            "consistency": {
                "feature_runtime": features.runtime,
                "top1_agreement_with_cached_features": agreement,
                "max_abs_logit_difference": float(np.abs(feature_logits - logits).max()),
            },
            "warnings": warnings,
            "predictions": predictions,
            "seconds": round(time.perf_counter() - started, 2),
        }
        atomic.write_json(out / EVAL_NAME, result)
        return {"top1": full["top1"], "top5": full["top5"], "bin_accuracy": full["bin_accuracy"], "n": full["n"]}

    run_stage(STAGE, directory, inputs, produce, force=force)
    return json.loads((directory / EVAL_NAME).read_text(encoding="utf-8"))
