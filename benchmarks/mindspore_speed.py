"""MindSpore MobileNetV2 speed on this CPU, side by side with ONNX Runtime fp32 on the same network.

One run measures (medians, 2 threads): the MindSpore forward pass at batch 1 and 32 in
BatchNorm form and folded, eagerly (PyNative) and compiled (`mindspore.jit`), one training
step at batch 16 (BatchNorm form, backbone + 26-class head, momentum SGD), and ONNX Runtime
on `mindspore.export(..., "ONNX")` of the folded network, with its parity against MindSpore.
"folded (jit)" is what edge-build runs for bulk inference (`network.inference_forward`, used by
`runners.MindSporeRunner`); "BN (jit)" is for comparison only (BatchNorm cells stay PyNative).

    python benchmarks/mindspore_speed.py                       # the project's MindSpore (.venv)
    PYTHONPATH=. /tmp/ms210/bin/python benchmarks/mindspore_speed.py   # another MindSpore install
    ONEDNN_MAX_CPU_ISA=AVX2 PYTHONPATH=. /tmp/ms210/bin/python benchmarks/mindspore_speed.py

Needs only MindSpore, numpy and onnxruntime (not the rest of edge-build's dependencies), so it
runs against any MindSpore version. Environment settings come from `edge_build.msenv`;
variables already set in the environment win over its defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_build import atomic, network
from edge_build.msenv import mindspore_module, threads

THREADS = 2
ENV_KEYS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")


def round_robin_ms(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, Any]:
    """Median wall time of each function, timed in turns so that a burst of load hits them all alike.

    The first call of each function is timed apart (it includes jit compilation).
    """
    first = {}
    for name, function in functions.items():
        start = time.perf_counter()
        function()
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_ms": statistics.median(t) * 1000.0,
            "min_ms": min(t) * 1000.0,
            "first_ms": first[name] * 1000.0,
            "all_ms": t,
        }
        for name, t in times.items()
    }


def realistic_weights(cell: Any, ms: Any, seed: int = 0) -> None:
    """He-normal conv weights and non-trivial BatchNorm statistics.

    MindSpore's default init shrinks activations layer after layer until the logits no longer
    depend on the input, which would make the ONNX parity check below meaningless.
    """
    rng = np.random.default_rng(seed)
    for param in cell.get_parameters():
        shape = tuple(param.shape)
        if param.name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif param.name.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        elif param.name.endswith(("moving_mean", "beta")):
            value = rng.normal(0.0, 0.1, shape)
        else:
            continue
        param.set_data(ms.Tensor(value.astype(np.float32)))


def train_step_fn(ms: Any, classifier: Any) -> Callable[[Any, Any], Any]:
    loss_fn = ms.nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = ms.nn.Momentum(classifier.trainable_params(), learning_rate=0.001, momentum=0.9)

    def forward(x: Any, y: Any) -> Any:
        return loss_fn(classifier(x), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    def step(x: Any, y: Any) -> Any:
        loss, grads = grad_fn(x, y)
        optimizer(grads)
        return loss

    return step


def export_onnx(ms: Any, cell: Any, batch: int, directory: Path) -> Path:
    target = directory / f"folded_b{batch}.onnx"
    sample = ms.Tensor(np.zeros((batch, 3, 224, 224), np.float32))
    ms.export(cell, sample, file_name=str(target.with_suffix("")), file_format="ONNX")
    try:  # the pads-order fix from edge_build.onnx_graph when onnx is installed (see its docstring)
        import onnx

        from edge_build.onnx_graph import fix_pad_order

        model = onnx.load(str(target))
        fix_pad_order(model)
        onnx.save(model, str(target))
    except ImportError:
        pass
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per batch-1 measurement")
    parser.add_argument("--repeats-large", type=int, default=4, help="timed runs per batch-32 / training measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--backbone-ckpt", type=Path, help="imported backbone checkpoint (default: random weights)")
    parser.add_argument("--ms-threads", type=int, help="MindSpore CPU kernel threads (its default is 25)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    ms = mindspore_module()
    import_s = time.perf_counter() - t0
    if args.ms_threads:
        ms.device_context.cpu.op_tuning.threads_num(args.ms_threads)
    from edge_build.runners import OnnxRunner

    rng = np.random.default_rng(0)
    inputs = {b: rng.uniform(-1, 1, (b, 3, 224, 224)).astype(np.float32) for b in (1, 32)}
    tensors = {b: ms.Tensor(x) for b, x in inputs.items()}

    classifier = network.build_classifier(network.build_backbone("tf_same"), network.build_head(26))
    if args.backbone_ckpt:
        network.load_checkpoint(classifier.backbone, args.backbone_ckpt)
    else:
        realistic_weights(classifier, ms)
    classifier.set_train(False)
    folded = network.fold_batchnorm(classifier)
    reference = {b: folded(tensors[b]).asnumpy() for b in (1, 32)}
    # compiled forward passes of the same networks; calling the cells themselves stays PyNative
    bn_compiled = ms.jit(network._twin(classifier).construct)
    folded_compiled = network.InferenceForward(folded, compile_after_images=1, enabled=True)

    kernel_threads = args.ms_threads or "default (25)"
    print(
        f"MindSpore {ms.__version__} (kernel threads {kernel_threads}), ONNX Runtime threads {THREADS}, "
        f"{threads()} usable cores",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    parity: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, 32):
            x, array = tensors[batch], inputs[batch]
            runner = OnnxRunner(export_onnx(ms, folded, batch, Path(tmp)), threads=THREADS)
            ref = reference[batch]
            parity[batch] = float(np.abs(runner.run(array) - ref).max() / (np.abs(ref).max() + 1e-12))
            functions = {
                "mindspore BN (pynative)": lambda x=x: classifier(x).asnumpy(),
                "mindspore folded (pynative)": lambda x=x: folded(x).asnumpy(),
                "mindspore BN (jit)": lambda x=x: bn_compiled(x).asnumpy(),
                "mindspore folded (jit)": lambda x=x: folded_compiled(x).asnumpy(),
                "onnxruntime fp32 (folded export)": lambda r=runner, a=array: r.run(a),
            }
            repeats = args.repeats if batch == 1 else args.repeats_large
            for config, timing in round_robin_ms(functions, repeats).items():
                rows.append(
                    {"config": config, "batch": batch, **{k: round(v, 1) for k, v in timing.items() if k != "all_ms"}}
                )
                median, first = timing["median_ms"], timing["first_ms"]
                print(f"  {config:<32} batch {batch:>2}: {median:9.1f} ms (first call {first:.0f} ms)", flush=True)

    if not args.skip_train:
        trainable = network.build_classifier(network.build_backbone("tf_same"), network.build_head(26))
        realistic_weights(trainable, ms)
        trainable.set_train(True)
        step = train_step_fn(ms, trainable)
        x16 = ms.Tensor(inputs[32][:16])
        y16 = ms.Tensor(rng.integers(0, 26, 16).astype(np.int32))
        timing = round_robin_ms({"train": lambda: step(x16, y16).asnumpy()}, args.repeats_large)["train"]
        rows.append(
            {
                "config": "mindspore train step BN (pynative)",
                "batch": 16,
                "median_ms": round(timing["median_ms"], 1),
                "min_ms": round(timing["min_ms"], 1),
                "first_ms": round(timing["first_ms"], 1),
                "spread_ms": [round(t * 1000) for t in timing["all_ms"]],
            }
        )
        print(f"  train step batch 16: {timing['median_ms']:.0f} ms, all {rows[-1]['spread_ms']}", flush=True)

    ort = {r["batch"]: r["median_ms"] for r in rows if r["config"].startswith("onnxruntime")}
    for row in rows:
        if row["batch"] in ort and not row["config"].startswith(("onnxruntime", "mindspore train")):
            row["x_ort"] = round(row["median_ms"] / ort[row["batch"]], 2)
    load_after = os.getloadavg()
    result = {
        "mindspore": ms.__version__,
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "threads": THREADS,
        "ms_threads": args.ms_threads or "default (25)",
        "import_s": round(import_s, 2),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in load_after],
        "onnx_parity_rel_max_diff": parity,
        "rows": rows,
    }
    print()
    print(f"| config (MindSpore {ms.__version__} {result['env']}) | batch | median ms | min ms | ms/img | x ORT |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        per_image = row["median_ms"] / row["batch"]
        x_ort = row.get("x_ort", "")
        cells = f"{row['median_ms']:.1f} | {row['min_ms']:.1f} | {per_image:.1f} | {x_ort}"
        print(f"| {row['config']} | {row['batch']} | {cells} |")
    print(f"\nONNX export parity (max |ORT - MindSpore| / max |MindSpore|): {parity}")
    print(f"load average before {result['load_avg_before']}, after {result['load_avg_after']} (2-core machine)")
    if args.json:
        atomic.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
