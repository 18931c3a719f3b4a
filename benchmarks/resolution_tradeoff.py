"""Input resolution vs latency and accuracy for the lite target: which size to ship.

MobileNetV2 is fully convolutional, so the trained network runs at any input size. For
each candidate size (the lite profile's `resolution.candidates`) this script measures,
in one run on this machine:

- accuracy: the 26-class head refitted on the trained backbone's features at that size
  (multinomial logistic regression, the same fixed L2 at every size), scored by
  duplicate-aware k-fold cross-validation on the training split (`edge_build.folds`:
  exact copies and near-duplicates never straddle a fold) and, refitted on the whole
  training split, on the validation split; plus the unchanged 224-trained network at
  that size through its int8 model (no refit), on the validation split;
- latency: the int8 ONNX at that size (QDQ, uint8 activations, int8 per-channel weights,
  MinMax calibration on training images after `quant_pre_process`) benchmarked by
  `edge_build.bench.run_bench` at batch 1, interleaved with Google's int8 MobileNetV2 in
  LiteRT at 224 (same threads, same run), so every ratio is to LiteRT-at-224.

The choice: the fastest size whose cross-validated top-1 stays within the profile's
`budget.max_accuracy_drop_pt` of the 224 figure. Written to OUT/resolution.json.

    python benchmarks/resolution_tradeoff.py --build build --out build/resolution

Needs a trained model in --build (`edge-build train`); it writes only under --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_build import atomic
from edge_build.bench import LITERT_REFERENCE, BenchSettings, render_table, run_bench
from edge_build.config import load_settings
from edge_build.dataset import list_split
from edge_build.hashing import sha256_file
from edge_build.images import load_rgb
from edge_build.preprocessing import Preprocessing
from edge_build.targets import load_target
from edge_build.taxonomy import NUM_CLASSES

L2 = 1e-3
CHUNK = 64


def export_models(trained: Any, size: int, directory: Path, calibration: np.ndarray) -> dict[str, Path]:
    """Classifier and backbone ONNX at `size`, and the int8 classifier."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edge_build.export import export_onnx

    cell = trained.network(fold_bn=True)
    directory.mkdir(parents=True, exist_ok=True)
    classifier = export_onnx(cell, directory / "classifier.onnx", size)
    backbone = export_onnx(cell.backbone, directory / "backbone.onnx", size, output_name="features")
    prepared = directory / "prepared.onnx"
    quant_pre_process(str(classifier), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    int8 = directory / "classifier_int8.onnx"
    with atomic.atomic_path(int8) as tmp:
        quantize_static(
            str(prepared),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return {"classifier": classifier, "backbone": backbone, "int8": int8}


def features(refs: list[Any], sizes: list[int], backbones: dict[int, Any], pre: Preprocessing) -> dict[str, Any]:
    """Backbone features per size, plus the keys for duplicate-aware folds; images decoded once."""
    from edge_build.folds import perceptual_hashes
    from edge_build.hashing import sha256_bytes

    out: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    file_keys, pixel_keys, phash, dhash = [], [], [], []
    for start in range(0, len(refs), CHUNK):
        rgbs = [load_rgb(ref.path) for ref in refs[start : start + CHUNK]]
        for ref, rgb in zip(refs[start : start + CHUNK], rgbs, strict=True):
            file_keys.append(sha256_file(ref.path))
            pixel_keys.append(sha256_bytes(rgb.tobytes()))
            p, d = perceptual_hashes(rgb)
            phash.append(p)
            dhash.append(d)
        for size in sizes:
            sized = replace(pre, size=size)
            out[size].append(backbones[size].run(np.stack([sized.apply(rgb) for rgb in rgbs])))
    return {
        "features": {s: np.concatenate(v).reshape(len(refs), -1) for s, v in out.items()},
        "keys": (file_keys, pixel_keys),
        "phash": np.array(phash, dtype=np.uint64),
        "dhash": np.array(dhash, dtype=np.uint64),
    }


def fit_head(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with L2, by L-BFGS (standardized features)."""
    from scipy.optimize import minimize

    n, d = x.shape
    onehot = np.eye(NUM_CLASSES, dtype=np.float64)[y]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[: d * NUM_CLASSES].reshape(d, NUM_CLASSES), params[d * NUM_CLASSES :]
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        value = -np.log(prob[np.arange(n), y] + 1e-12).mean() + 0.5 * L2 * (w**2).sum()
        grad = (prob - onehot) / n
        return value, np.concatenate([(x.T @ grad + L2 * w).ravel(), grad.sum(axis=0)])

    result = minimize(
        loss, np.zeros(d * NUM_CLASSES + NUM_CLASSES), jac=True, method="L-BFGS-B", options={"maxiter": 500}
    )
    return result.x[: d * NUM_CLASSES].reshape(d, NUM_CLASSES), result.x[d * NUM_CLASSES :]


def top1(x: np.ndarray, y: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> float:
    return float(100.0 * np.mean(np.argmax(x @ head[0] + head[1], axis=1) == y))


def cross_validated(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    correct = 0
    for fold in np.unique(folds):
        test = folds == fold
        mean, std = x[~test].mean(axis=0), x[~test].std(axis=0) + 1e-6
        head = fit_head((x[~test] - mean) / std, y[~test])
        correct += int(np.sum(np.argmax(((x[test] - mean) / std) @ head[0] + head[1], axis=1) == y[test]))
    return 100.0 * correct / len(y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, default=None, help="build directory with the trained model")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", default="lite")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    from edge_build.folds import duplicate_groups, grouped_folds
    from edge_build.runners import OnnxRunner
    from edge_build.trained import load_trained

    settings = load_settings({"build": args.build, "data": args.data})
    target = load_target(args.target, settings["targets"].path)
    sizes = sorted(target.resolution.candidates, reverse=True)
    if 224 not in sizes:
        sizes.insert(0, 224)
    trained = load_trained(settings.build_dir)
    pre = trained.preprocessing
    train_refs, val_refs = list_split(settings.data.path, "train"), list_split(settings.data.path, "val")
    started = time.perf_counter()

    models, backbones = {}, {}
    for size in sizes:
        calibration = replace(pre, size=size).prepare_batch([r.path for r in train_refs[::25]])
        models[size] = export_models(trained, size, args.out / str(size), calibration)
        backbones[size] = OnnxRunner(models[size]["backbone"], threads=target.runtime.threads)
        print(f"size {size}: exported and quantized ({time.perf_counter() - started:.0f} s)", flush=True)
    train = features(train_refs, sizes, backbones, pre)
    val = features(val_refs, sizes, backbones, pre)
    print(f"features done ({time.perf_counter() - started:.0f} s)", flush=True)
    y_train = np.array([r.label for r in train_refs])
    y_val = np.array([r.label for r in val_refs])
    groups = duplicate_groups(*train["keys"], phash=train["phash"], dhash=train["dhash"])
    folds = grouped_folds(y_train, groups, args.folds, seed=0)

    accuracy = {}
    for size in sizes:
        x, xv = train["features"][size], val["features"][size]
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        head = fit_head((x - mean) / std, y_train)
        accuracy[size] = {
            "cv_top1": cross_validated(x, y_train, folds),
            "val_top1_refit": top1((xv - mean) / std, y_val, head),
        }
        print(f"size {size}: {accuracy[size]}", flush=True)

    bench_settings = BenchSettings.from_target(target, batch_sizes=(1,), target=f"{target.name}-resolution")
    report = run_bench(
        bench_settings,
        {f"int8_{size}": models[size]["int8"] for size in sizes},
        None,
        settings.data.path,
        args.out / "bench",
        None,
        litert_reference=settings.weights.path.parent / LITERT_REFERENCE,
        preprocessing=pre,
        force=True,
        log=lambda m: print(m, flush=True),
    )
    print(render_table(report))
    baseline = accuracy[224]["cv_top1"]
    rows = []
    for size in sizes:
        row = report.result(f"int8_{size}")
        rows.append(
            {
                "size": size,
                **accuracy[size],
                "cv_drop_pt": baseline - accuracy[size]["cv_top1"],
                "val_top1_int8_no_refit": row.top1,
                "int8_p50_ms": row.latency[1].p50_ms,
                "ratio_vs_litert_224": row.ratios[1]["vs_litert"],
                "int8_bytes": row.size_bytes,
            }
        )
    allowed = [r for r in rows if r["cv_drop_pt"] <= target.budget.max_accuracy_drop_pt]
    chosen = min(allowed, key=lambda r: r["int8_p50_ms"])
    summary = {
        "target": target.name,
        "max_accuracy_drop_pt": target.budget.max_accuracy_drop_pt,
        "folds": args.folds,
        "l2": L2,
        "train_images": len(train_refs),
        "duplicate_groups": int(groups.max()) + 1,
        "rows": rows,
        "chosen_size": chosen["size"],
        "litert_224_p50_ms": report.result("litert").latency[1].p50_ms,
        "load_average": report.load_average,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic.write_json(args.out / "resolution.json", summary)
    header = ("size", "CV top-1", "drop pt", "val refit", "val int8", "p50 ms", "x LiteRT@224")
    print("\n" + "  ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 7, 9, 8, 7, 12), strict=True)))
    for r in rows:
        print(
            f"{r['size']:>4}  {r['cv_top1']:8.2f}  {r['cv_drop_pt']:7.2f}  {r['val_top1_refit']:9.2f}  "
            f"{r['val_top1_int8_no_refit']:8.2f}  {r['int8_p50_ms']:7.3f}  {r['ratio_vs_litert_224']:12.3f}"
        )
    print(f"chosen: {chosen['size']} (fastest within {target.budget.max_accuracy_drop_pt} pt of 224's CV top-1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
