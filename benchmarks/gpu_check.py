"""The gpu target's check on a real NVIDIA GPU: parity and latency under ONNX Runtime's CUDA EP.

Two steps, because the GPU machine has no MindSpore and no data set:

  # here (CPU): after `edge-build all --target gpu`, pack the models, the validation images
  # (uint8), their labels and the MindSpore network's logits (the parity reference)
  python benchmarks/gpu_check.py prepare --build build --out .gpu/run

  # on the GPU machine (onnxruntime-gpu installed): parity and latency, JSON to --report
  python benchmarks/gpu_check.py run --pack .gpu/run --report gpu_check.json

`run` needs only numpy and onnxruntime-gpu. It refuses to report a latency when the
session did not actually get the CUDA execution provider (no silent CPU fallback).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ("onnx_fp32", "onnx_fp16")


def prepare(build: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edge_build.config import load_settings
    from edge_build.dataset import list_split
    from edge_build.export import find_artifacts
    from edge_build.images import load_rgb
    from edge_build.runners import MindSporeRunner, run_batched
    from edge_build.trained import load_trained

    out.mkdir(parents=True, exist_ok=True)
    artifacts = find_artifacts(build, target="gpu")
    for kind in MODELS:
        shutil.copyfile(artifacts[kind], out / f"{kind}.onnx")
    trained = load_trained(build)
    pre = trained.preprocessing
    refs = list_split(load_settings().data.path, "val")
    pixels = np.stack([pre.resize_rgb(load_rgb(ref.path)) for ref in refs])
    reference = run_batched(MindSporeRunner(trained.network(fold_bn=True)), pre.normalize(pixels), 32)
    np.save(out / "pixels.npy", pixels)
    np.save(out / "labels.npy", np.array([ref.label for ref in refs], np.int64))
    np.save(out / "reference_logits.npy", reference)
    (out / "preprocessing.json").write_text(json.dumps(pre.as_dict()))
    print(f"packed {len(refs)} images and {len(MODELS)} models into {out}")


def _latency(session, name: str, batch: np.ndarray, warmup: int, min_time_s: float, min_runs: int) -> dict:
    for _ in range(warmup):
        session.run(None, {name: batch})
    times = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_time_s:
        t0 = time.perf_counter()
        session.run(None, {name: batch})
        times.append((time.perf_counter() - t0) * 1e3)
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    p50 = statistics.median(times)
    return {
        "batch": int(batch.shape[0]),
        "runs": len(times),
        "p50_ms": p50,
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "min_ms": ordered[0],
        "images_per_s": batch.shape[0] / (p50 / 1e3),
    }


def run(pack: Path, report: Path, batch_sizes: list[int]) -> int:
    import onnxruntime as ort

    pre = json.loads((pack / "preprocessing.json").read_text())
    pixels = np.load(pack / "pixels.npy")
    labels = np.load(pack / "labels.npy")
    reference = np.load(pack / "reference_logits.npy")
    floats = np.ascontiguousarray(
        (pixels.astype(np.float32) * np.float32(pre["scale"]) + np.float32(pre["offset"])).transpose(0, 3, 1, 2)
    )
    result = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "images": len(labels),
        "models": {},
    }
    failed = False
    for kind in MODELS:
        row: dict = {}
        configs = {"CUDAExecutionProvider": "CUDAExecutionProvider", "CPUExecutionProvider": "CPUExecutionProvider"}
        for label, config in configs.items():
            provider = label.split("+")[0]
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(pack / f"{kind}.onnx"), options, providers=[config])
            got = session.get_providers()[0]
            if got != provider:
                row[label] = {"refused": f"session runs on {got}, not {provider}: no latency reported"}
                failed |= provider == "CUDAExecutionProvider"
                continue
            name = session.get_inputs()[0].name
            logits = np.concatenate(
                [session.run(None, {name: floats[i : i + 32]})[0] for i in range(0, len(floats), 32)]
            )
            diff = np.abs(logits.astype(np.float64) - reference)
            cos = (logits * reference).sum(1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1))
            entry = {
                "parity": {
                    "max_abs": float(diff.max()),
                    "mean_abs": float(diff.mean()),
                    "cosine_min": float(cos.min()),
                    "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
                },
                "top1": float((logits.argmax(1) == labels).mean()),
                "reference_top1": float((reference.argmax(1) == labels).mean()),
                "latency": [],
            }
            sizes = batch_sizes if provider == "CUDAExecutionProvider" else [1, 32]
            for size in sizes:
                batch = np.ascontiguousarray(np.resize(floats, (size, *floats.shape[1:])))
                entry["latency"].append(_latency(session, name, batch, warmup=20, min_time_s=1.0, min_runs=50))
            row[label] = entry
            print(
                kind,
                provider,
                json.dumps(entry["parity"]),
                [(r["batch"], round(r["p50_ms"], 3)) for r in entry["latency"]],
            )
        result["models"][kind] = row
    report.write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--out", type=Path, default=Path(".gpu/run"))
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, default=Path(".gpu/run"))
    r.add_argument("--report", type=Path, default=Path("gpu_check.json"))
    r.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.build, args.out)
        return 0
    return run(args.pack, args.report, args.batch_sizes)


if __name__ == "__main__":
    sys.exit(main())
