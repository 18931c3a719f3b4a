"""Where MindSpore's CPU forward pass of MobileNetV2 spends its time, op by op.

Runs the folded, compiled (`mindspore.jit`) network edge-build uses for inference under
MindSpore's profiler and groups the host op time by op type and by the role of the conv
(stem, expand 1x1, depthwise 3x3, project 1x1, final 1x1), next to ONNX Runtime fp32 on
the same network in the same run. It answers why the MindSpore row of `edge-build bench`
is several times slower than ONNX Runtime: on MindSpore 2.7.0's CPU backend the convs run
in plain NCHW through oneDNN 2.2's `gemm:jit` (im2col + sgemm, one small GEMM per group),
so the 17 depthwise convs, a few percent of the FLOPs, take the largest share
(`ONEDNN_VERBOSE=1` shows the implementation), and every conv's bias is a separate BiasAdd.

    python benchmarks/mindspore_op_profile.py [--batch 1] [--threads 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_build import atomic, network
from edge_build.msenv import mindspore_module

ROLES = ("depthwise", "expand", "project")


def role_of(full_op_name: str) -> str:
    """'stem', 'expand', 'depthwise', 'project', 'final' or 'other' from a profiler scope name."""
    for role in ROLES:
        if f"/{role}-" in full_op_name:
            return role
    if "/0-ConvBNAct/" in full_op_name:
        return "stem"
    if "-ConvBNAct/" in full_op_name:
        return "final"
    return "other"


def median_ms(function: Any, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def profile_ops(ms: Any, forward: Any, x: Any, steps: int, directory: Path) -> dict[tuple[str, str], float]:
    """Total host time per (op type, role) over `steps` forward passes, in ms per pass."""
    from mindspore import Profiler

    profiler = Profiler(output_path=str(directory))
    for _ in range(steps):
        forward(x).asnumpy()
    profiler.analyse()
    details = sorted(directory.rglob("cpu_op_detail_info_*.csv"))
    if not details:
        raise SystemExit(f"the MindSpore profiler wrote no cpu_op_detail_info csv under {directory}")
    totals: dict[tuple[str, str], float] = defaultdict(float)
    with details[0].open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            totals[(row["op_type"], role_of(row["full_op_name"]))] += float(row["op_total_time(ms)"]) / steps
    return dict(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="MindSpore kernel threads and ONNX Runtime threads")
    parser.add_argument("--steps", type=int, default=10, help="profiled forward passes")
    parser.add_argument("--backbone-ckpt", type=Path, help="imported backbone checkpoint (default: random weights)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    ms = mindspore_module()
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    from edge_build.runners import OnnxRunner

    classifier = network.build_classifier(network.build_backbone("tf_same"), network.build_head(26))
    if args.backbone_ckpt:
        network.load_checkpoint(classifier.backbone, args.backbone_ckpt)
    classifier.set_train(False)
    folded = network.fold_batchnorm(classifier)
    forward = ms.jit(network._twin(folded).construct)
    array = np.random.default_rng(0).uniform(-1, 1, (args.batch, 3, 224, 224)).astype(np.float32)
    x = ms.Tensor(array)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "folded.onnx"
        ms.export(folded, x, file_name=str(onnx_path.with_suffix("")), file_format="ONNX")
        runner = OnnxRunner(onnx_path, threads=args.threads)
        ort_ms = median_ms(lambda: runner.run(array), 20)
        ms_ms = median_ms(lambda: forward(x).asnumpy(), 20)
        ops = profile_ops(ms, forward, x, args.steps, Path(tmp) / "profile")

    profiled = sum(ops.values())
    rows = sorted(({"op": op, "role": role, "ms": ms_} for (op, role), ms_ in ops.items()), key=lambda r: -r["ms"])
    print(f"MindSpore {ms.__version__}, batch {args.batch}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(
        f"forward (wall, median): MindSpore {ms_ms:.1f} ms, ONNX Runtime fp32 {ort_ms:.1f} ms, "
        f"ratio {ms_ms / ort_ms:.2f}x; profiled op time {profiled:.1f} ms, framework {ms_ms - profiled:.1f} ms"
    )
    print("\n| op | role | ms per pass | share of wall |\n|---|---|---:|---:|")
    for row in rows:
        if row["ms"] >= 0.05:
            print(f"| {row['op']} | {row['role']} | {row['ms']:.2f} | {row['ms'] / ms_ms:.0%} |")
    if args.json:
        atomic.write_json(
            args.json,
            {
                "mindspore": ms.__version__,
                "batch": args.batch,
                "threads": args.threads,
                "mindspore_ms": ms_ms,
                "onnxruntime_fp32_ms": ort_ms,
                "profiled_ms": profiled,
                "ops": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
