"""A small but complete bundle for the report tests, built with the stages' own result types.

Where a stage has a result class (doctor, verify, bench, history, bundle manifest), the
payload comes from that class's serializer, so the report is tested against the shapes
the stages really write; training.json and eval.json follow their stage's record layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edge_build import atomic, bench, bundle, evaluation, history, verify
from edge_build.doctor import DoctorReport, Finding
from edge_build.targets import DEFAULT_PARITY
from edge_build.taxonomy import CODES, NUM_CLASSES

VAL_IMAGES_PER_CLASS = 2


def make_data_set(root: Path) -> list[str]:
    """val/<code>/<n>.jpg, two small coloured images per class; returns their keys."""
    keys = []
    rng = np.random.default_rng(0)
    for index, code in enumerate(CODES):
        for n in range(VAL_IMAGES_PER_CLASS):
            path = root / "val" / code / f"{n:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((48, 64, 3), (index * 9 % 255, 90 + n * 60, 200 - index * 7), dtype=np.uint8)
            pixels[8:40, 8:40] = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            keys.append(f"val/{code}/{n:05d}.jpg")
    return keys


def doctor_payload(root: Path) -> dict[str, Any]:
    counts = {
        "train": {code: {"files": 84, "usable": 84, "distinct": 80 + i % 4} for i, code in enumerate(CODES)},
        "val": {code: {"files": 5, "usable": 5, "distinct": 5} for code in CODES},
    }
    counts["train"]["03_03"]["distinct"] = 5
    report = DoctorReport(
        root=root,
        strict=False,
        splits_found=["train", "val"],
        extra_folders=[],
        classes_found={"train": list(CODES), "val": list(CODES)},
        counts=counts,
        label_file={"path": "label.txt", "readable": True, "encoding": "gbk", "disagreements": []},
        images={
            "files": 2314,
            "usable": 2314,
            "bytes": 18_000_000,
            "formats": {"JPEG": 2314},
            "sizes": {"224x224": 2314},
        },
        imbalance={},
        duplicates={
            "groups": [{"sha256": "ab" * 32, "paths": ["val/00_01/00040.jpg", "train/00_01/00043.jpg"]}],
            "redundant_files": 1,
            "within_class_copies": 0,
            "label_conflicts": [],
            "leakage": [{"path": "val/00_01/00040.jpg", "train": ["train/00_01/00043.jpg"]}],
        },
        near_duplicates={"counts": {"across_classes": 0, "across_splits": 2, "within_class": 5}, "pairs": []},
        findings=[
            Finding(
                "error",
                "leakage",
                "1 non-training images are byte-identical to training images (leakage)",
                "remove them from one split",
                ["val/00_01/00040.jpg"],
                ["also in training as train/00_01/00043.jpg"],
            ),
            Finding("warning", "underrepresented_class", "1 classes have under 50% of the median", "add images"),
        ],
        elapsed_s=1.25,
        workers=2,
    )
    return report.to_json()


def training_payload() -> dict[str, Any]:
    steps_per_epoch, epochs = 4, 10
    per_step = [
        0.03 * 0.5 * (1 + np.cos(np.pi * s / (steps_per_epoch * epochs))) for s in range(steps_per_epoch * epochs)
    ]
    table = [
        {
            "lr": lr,
            "weight_decay": wd,
            "epochs": 10,
            "cv_accuracy": 0.80 + lr + wd / 10,
            "cv_accuracy_std": 0.02,
            "cv_nll": 0.7 - lr,
            "fold_accuracy": [0.8, 0.82, 0.79],
        }
        for lr in (0.01, 0.03)
        for wd in (0.001, 0.01)
    ]
    table.sort(key=lambda r: -r["cv_accuracy"])
    return {
        "schema": 1,
        "num_classes": NUM_CLASSES,
        "architecture": "MobileNetV2 1.0 224 backbone (frozen) + nn.Dense(1280, 26)",
        "inputs": {"train_images": 2184, "feature_runtime": "onnxruntime (parity-checked)"},
        "hyperparameters": {
            "lr": 0.03,
            "lr_schedule": "cosine",
            "warmup_epochs": 1,
            "epochs": 10,
            "weight_decay": 0.01,
        },
        "search": {
            "folds": 3,
            "images": 2184,
            "duplicate_groups": 2100,
            "selection": "highest mean CV accuracy (to 0.1 pt), then lowest mean held-out log-loss",
            "table": table,
            "chosen": {"lr": 0.03, "weight_decay": 0.01, "epochs": 10},
            "seconds": 12.5,
        },
        "history": {"epoch_loss": [2.5 / (e + 1) for e in range(epochs)], "train_accuracy": 0.97, "train_nll": 0.1},
        "learning_rate": {"steps_per_epoch": steps_per_epoch, "per_step": per_step},
        "seconds": 42.0,
    }


def evaluation_payload(keys: list[str]) -> dict[str, Any]:
    """eval.json as `edge_build.evaluation` writes it: every image right except one in each of the
    first five classes; the first image of 00_01 also occurs in training."""
    labels = np.array([CODES.index(key.split("/")[1]) for key in keys])
    wrong = np.array([key.endswith("00001.jpg") and label < 5 for key, label in zip(keys, labels, strict=True)])
    predicted = np.where(wrong, (labels + 3) % NUM_CLASSES, labels)
    logits = np.full((len(keys), NUM_CLASSES), -2.0, dtype=np.float32)
    logits[np.arange(len(keys)), predicted] = 2.5
    leaked = np.array([key == "val/00_01/00000.jpg" for key in keys])
    full = evaluation.metrics(logits, labels)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    summary = ("n", "correct", "top1", "top5", "bin_accuracy")
    return {
        "schema": evaluation.SCHEMA,
        "split": "val",
        "runtime": "mindspore (network checkpoint, BatchNorm folded)",
        **full,
        "subsets": {
            "all": {k: full[k] for k in summary},
            "without_exact_duplicates": {k: evaluation.metrics(logits[~leaked], labels[~leaked])[k] for k in summary},
        },
        "leakage": {
            "same_file": [k for k, hit in zip(keys, leaked, strict=True) if hit],
            "same_pixels": [],
            "near_duplicate": [],
        },
        "warnings": ["1 of 52 validation images also occur in the training split"],
        "predictions": [
            {
                "key": key,
                "true": CODES[int(label)],
                "predicted": CODES[int(pred)],
                "probability": round(float(probabilities[i, pred]), 6),
                "correct": bool(pred == label),
                "leak": "same_file" if leaked[i] else None,
            }
            for i, (key, label, pred) in enumerate(zip(keys, labels, predicted, strict=True))
        ],
    }


def parity_payload(keys: list[str], int8_fails: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    want = rng.normal(size=(len(keys), NUM_CLASSES)).astype(np.float32)
    artifacts = []
    for kind, noise in (("onnx_fp32", 1e-6), ("onnx_int8", 0.5 if int8_fails else 0.05), ("mindir", 0.0)):
        tolerance = verify.tolerance_for(kind, DEFAULT_PARITY)
        got = want + rng.normal(scale=noise, size=want.shape).astype(np.float32) if noise else want.copy()
        output = verify.compare("logits", got, want, keys, tolerance)
        status = "pass" if output.passed else "fail"
        artifacts.append(
            verify.ArtifactParity(
                kind,
                f"build/export/model_{kind}.onnx",
                status,
                {
                    "max_abs": tolerance.max_abs,
                    "min_cosine": tolerance.min_cosine,
                    "top1_agreement": tolerance.top1_agreement,
                },
                runtime="onnxruntime CPU",
                outputs=[output],
                diagnosis=["no known input mistake reproduces the outputs"] if status == "fail" else [],
            )
        )
    report = verify.ParityReport(
        artifacts=artifacts,
        reference={"runtime": "mindspore 2.7.0 float32 (PyNative, CPU), BatchNorm folded"},
        images={"count": len(keys), "size": 224},
        seconds=3.2,
    )
    return report.as_dict()


def _latency(batch: int, p50: float) -> bench.Latency:
    rounds = [[p50 * f for f in (0.97, 1.0, 1.02, 1.1)] for _ in range(3)]
    return bench.Latency.from_rounds(batch, rounds)


def bench_report(p50_scale: float = 1.0) -> bench.BenchReport:
    rows = []
    for name, role, runtime, p50 in (
        ("ort_int8", "artifact", "onnxruntime", 1.4),
        ("onnx_fp32", "artifact", "onnxruntime", 4.8),
        ("mindspore", "reference", "mindspore", 11.9),
        ("litert", "reference", "litert", 0.9),
    ):
        rows.append(
            bench.SubjectResult(
                name=name,
                role=role,
                runtime=runtime,
                device="cpu",
                path=None,
                sha256=None,
                size_bytes=2_600_000 if role == "artifact" else None,
                input_format="uint8_nhwc",
                input_size=224,
                load_ms=35.0,
                first_run_ms=3.0,
                peak_rss_mb=80.0,
                baseline_rss_mb=40.0,
                latency={1: _latency(1, p50 * p50_scale), 8: _latency(8, 7.5 * p50 * p50_scale)},
                top1=(90.4 if name == "onnx_fp32" else 88.5) if role == "artifact" else None,
                accuracy_images=130 if role == "artifact" else 0,
                within_budget=(p50 * p50_scale <= 2.0) if role == "artifact" else None,
            )
        )
    report = bench.BenchReport(
        target="lite",
        settings={
            "threads": 2,
            "providers": ["CPUExecutionProvider"],
            "latency_budget_ms": 2.0,
            "latency_budget_batch": 1,
        },
        machine_id="test-cpu-2c-linux-0123456789",
        machine={"cpu": "Test CPU", "cores": 2},
        created="2026-01-02T03:04:05+00:00",
        duration_s=12.0,
        load_average={"before": [0.5], "after": [0.6]},
        results=rows,
        method=bench.METHOD,
    )
    bench._ratios(report.results)
    return report


def history_records(report: bench.BenchReport, slow_run: int = 3) -> list[dict[str, Any]]:
    """Five runs of the report's subjects; run `slow_run` is 40 % slower (a regression), then it recovers."""
    records = []
    for run in range(5):
        scale = 1.4 if run == slow_run else 1.0
        latency = {
            row.name: {
                str(b): {"p50_ms": lat.p50_ms * scale, "spread_ms": lat.spread_ms} for b, lat in row.latency.items()
            }
            for row in report.results
        }
        record = history.new_record("lite", f"{run:07d}abcdef", {}, latency)
        record["date"] = f"2026-01-0{run + 1}T10:00:00+00:00"
        record["machine_id"] = report.machine_id
        records.append(record)
    return records


def make_bundle(tmp_path: Path, *, int8_fails: bool = False) -> dict[str, Path]:
    """A bundle directory with every result file, a data set for thumbnails and a history file."""
    data = tmp_path / "data"
    keys = make_data_set(data)
    staging = tmp_path / "dist" / "lite"
    staging.mkdir(parents=True)
    atomic.write_bytes(staging / "model_int8.ort", b"\x00" * 1000)
    atomic.write_json(staging / "labels.json", {"classes": list(CODES)})
    atomic.write_json(staging / "doctor.json", doctor_payload(data))
    atomic.write_json(staging / "training.json", training_payload())
    atomic.write_json(staging / "eval.json", evaluation_payload(keys))
    atomic.write_json(staging / "parity.json", parity_payload(keys, int8_fails))
    report = bench_report()
    atomic.write_json(staging / "bench.json", report.as_dict())
    bundle.write_manifest(staging, {"target": "lite"})
    history_dir = tmp_path / "history"
    for record in history_records(report):
        history.append_record(history_dir, record)
    return {"bundle": staging, "data": data, "history": history_dir}


def rewrite(path: Path, change: Any) -> None:
    """Apply `change(payload)` to a JSON file in place (for tests that break one field)."""
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload = change(payload) or payload
    atomic.write_json(path, payload)
