"""Probe: the lite int8 model's batch-1 latency against Google's int8 MobileNetV2 in LiteRT.

Builds the int8 variants from an fp32 ONNX (each step of the lite recipe on top of the
previous one), then times them and LiteRT's `tf2_mobilenet_v2_1.0_224_ptq.tflite`
(XNNPACK) in the same process, same threads, interleaved: every round runs each
subject in turn (order rotated per round) so machine drift hits all of them. Reports
p50 over all timed runs, the ratio to LiteRT's p50, and the median of per-round ratios.

    python benchmarks/lite_speed_probe.py --model build/export/network.onnx
    python benchmarks/lite_speed_probe.py --model M.onnx --rounds 30 --iters 50 --json probe.json

Every subject runs in its own process, stopped (SIGSTOP) while the others are timed:
in one process, ONNX Runtime's spinning worker threads of the session timed last keep
stealing the cores from the next subject (LiteRT measured 2x slower that way).

The variants (all QDQ, uint8 activations, int8 per-channel weights, MinMax calibration
on the committed calibration list, after quant_pre_process):
  float_in        float NCHW input (the input quantized inside the graph)
  u8_in           + raw uint8 NHWC pixels in, x/127.5-1 folded into the input quantization
  u8_gap          + ReduceMean(H,W) as GlobalAveragePool: int8 NHWC pooling, no layout transpose
  u8_gap_stem     + the stem conv fed 4 pixels per position (12 channels: ORT's fast int8 conv)
  u8_gap_stem.ort the same as ORT format (what the lite bundle ships)
With --bound also: the .ort with its input bound once (IOBinding) against LiteRT's
invoke() with the input set once: the runtimes without the Python feed overhead.
With --sizes 192,160 also the shipped recipe at smaller inputs (latency only: the
head is not retrained at that size here, so no accuracy is claimed for them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_build import quant_graph  # noqa: E402
from edge_build.calibration import ensure_calibration  # noqa: E402
from edge_build.preprocessing import Preprocessing  # noqa: E402
from edge_build.quantize import prepare_float_model, quantize_prepared  # noqa: E402

LITERT_MODEL = REPO.parent / "shared" / "weights" / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
SETTINGS = {
    "method": "minmax",
    "percentile": None,
    "per_channel": True,
    "activation_type": "uint8",
    "weight_type": "int8",
    "reduce_range": False,
    "input_format": "float_nchw",
    "exclude_nodes": [],
}


def build_variants(fp32: Path, work: Path, data: Path, calibration_dir: Path) -> dict[str, Path]:
    import onnx

    from edge_build.ort_format import convert_to_ort

    calibration = ensure_calibration(calibration_dir, data)
    preprocessing = Preprocessing.from_dict(_metadata_preprocessing(fp32))
    variants: dict[str, Path] = {}
    for global_pool in (False, True):
        prepared = work / f"prepared_{global_pool}.onnx"
        qdq = work / f"qdq_{global_pool}.onnx"
        prepare_float_model(fp32, prepared, global_pool=global_pool)
        started = time.perf_counter()
        quantize_prepared(prepared, qdq, calibration, preprocessing, SETTINGS)
        print(f"quantized (global_pool={global_pool}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        model = onnx.load(str(qdq))
        if not global_pool:
            variants["float_in"] = qdq
            quant_graph.fold_uint8_input(model, preprocessing)
            variants["u8_in"] = _save(model, work / "u8_in.onnx")
            continue
        quant_graph.fold_uint8_input(model, preprocessing)
        variants["u8_gap"] = _save(model, work / "u8_gap.onnx")
        if quant_graph.group_stem_columns(model) is None:
            print("stem grouping not applicable to this model", file=sys.stderr)
        variants["u8_gap_stem"] = _save(model, work / "u8_gap_stem.onnx")
        variants["u8_gap_stem.ort"] = convert_to_ort(variants["u8_gap_stem"], work, name="u8_gap_stem.ort")
    return variants


def at_resolution(fp32: Path, size: int, out: Path) -> Path:
    """The fp32 model with a size x size input (MobileNetV2 is fully convolutional up to its global pool)."""
    import onnx

    from edge_build.onnx_graph import set_metadata

    model = onnx.load(str(fp32))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value, dims[3].dim_value = size, size
    del model.graph.value_info[:]
    preprocessing = {**_metadata_preprocessing(fp32), "size": size}
    set_metadata(model, {"edge_build.preprocessing": preprocessing})
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return _save(model, out)


def build_lite_at(fp32: Path, size: int, work: Path, data: Path, calibration_dir: Path) -> Path:
    """The shipped lite recipe (u8_gap_stem, ORT format) at another input size."""
    import onnx

    from edge_build.ort_format import convert_to_ort

    resized = at_resolution(fp32, size, work / f"fp32_{size}.onnx")
    preprocessing = Preprocessing.from_dict(_metadata_preprocessing(resized))
    prepared, qdq = work / f"prepared_{size}.onnx", work / f"qdq_{size}.onnx"
    prepare_float_model(resized, prepared)
    quantize_prepared(prepared, qdq, ensure_calibration(calibration_dir, data), preprocessing, SETTINGS)
    model = onnx.load(str(qdq))
    quant_graph.fold_uint8_input(model, preprocessing)
    quant_graph.group_stem_columns(model)
    return convert_to_ort(_save(model, work / f"lite_{size}.onnx"), work, name=f"lite_{size}.ort")


def _metadata_preprocessing(fp32: Path) -> dict:
    from edge_build.onnx_graph import read_metadata

    return read_metadata(fp32).get("edge_build.preprocessing") or {}


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


def ort_subject(path: Path, threads: int, image: np.ndarray, bound: bool = False) -> Callable[[], object]:
    """`session.run` per call; `bound`: input/output bound once (IOBinding), the runtime without Python's feed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    if model_input.type == "tensor(uint8)":
        feed = {model_input.name: image[None]}
    else:
        feed = {model_input.name: Preprocessing().normalize(image[None])}
    outputs = [session.get_outputs()[0].name]
    if bound:
        binding = session.io_binding()
        binding.bind_ortvalue_input(model_input.name, ort.OrtValue.ortvalue_from_numpy(next(iter(feed.values()))))
        binding.bind_output(outputs[0])
        return lambda: session.run_with_iobinding(binding)
    return lambda: session.run(outputs, feed)


def litert_subject(threads: int, image: np.ndarray, invoke_only: bool = False) -> Callable[[], object]:
    """`set_tensor` + `invoke` per call; `invoke_only`: the input set once (LiteRT's counterpart of IOBinding)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(LITERT_MODEL), num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    batch = image[None].astype(detail["dtype"])

    def run() -> None:
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()

    if invoke_only:
        interpreter.set_tensor(detail["index"], batch)
        return interpreter.invoke
    return run


def _make_subject(spec: tuple, threads: int) -> Callable[[], object]:
    from edge_build.images import load_rgb

    kind, path, size, bound = spec
    image = Preprocessing(size=size).resize_rgb(load_rgb(REPO.parent / "shared" / "weights" / "parrot.jpg"))
    if kind == "litert":
        return litert_subject(threads, image, invoke_only=bound)
    return ort_subject(Path(path), threads, image, bound=bound)


def _child(connection, spec: tuple, threads: int) -> None:
    """One subject per process: runs `n` calls per request and sends back the times (ms)."""
    function = _make_subject(spec, threads)
    connection.send("ready")
    while True:
        count = connection.recv()
        if count is None:
            return
        timings = []
        for _ in range(count):
            start = time.perf_counter()
            function()
            timings.append((time.perf_counter() - start) * 1e3)
        connection.send(timings)


def measure(subjects: dict[str, tuple], threads: int, rounds: int, iters: int, warmup: int) -> dict[str, dict]:
    """Each subject in its own process; only the one being timed runs, the others are stopped (SIGSTOP),
    so no runtime's idle spinning threads steal the cores from the next subject."""
    import multiprocessing
    import signal

    context = multiprocessing.get_context("spawn")
    children = {}
    for name, spec in subjects.items():
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_child, args=(child_end, spec, threads), daemon=True)
        process.start()
        if parent_end.recv() != "ready":
            raise RuntimeError(f"{name} did not start")
        os.kill(process.pid, signal.SIGSTOP)
        children[name] = (process, parent_end)

    def request(name: str, count: int) -> list[float]:
        process, connection = children[name]
        os.kill(process.pid, signal.SIGCONT)
        connection.send(count)
        timings = connection.recv()
        os.kill(process.pid, signal.SIGSTOP)
        return timings

    times: dict[str, list[float]] = {name: [] for name in subjects}
    round_medians: dict[str, list[float]] = {name: [] for name in subjects}
    names = list(subjects)
    try:
        for name in names:
            request(name, warmup)
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                batch = request(name, iters + 3)[3:]  # the first calls re-warm caches after the switch
                times[name] += batch
                round_medians[name].append(statistics.median(batch))
    finally:
        for process, connection in children.values():
            os.kill(process.pid, signal.SIGCONT)
            connection.send(None)
            process.join(timeout=10)
    reference = "litert"
    result = {}
    for name in names:
        p50 = statistics.median(times[name])
        ratios = [a / b for a, b in zip(round_medians[name], round_medians[reference], strict=True)]
        low = float(np.percentile(times[name], 10))
        result[name] = {
            "min_ms": round(min(times[name]), 4),
            "p10_ms": round(low, 4),
            "p10_ratio_to_litert": round(low / float(np.percentile(times[reference], 10)), 4),
            "p50_ms": round(p50, 4),
            "p90_ms": round(float(np.percentile(times[name], 90)), 4),
            "ratio_to_litert": round(p50 / statistics.median(times[reference]), 4),
            "median_round_ratio": round(statistics.median(ratios), 4),
            "runs": len(times[name]),
        }
    return result


def accuracy(variants: dict[str, Path], fp32: Path, data: Path) -> dict[str, dict]:
    from edge_build.dataset import list_split
    from edge_build.images import load_rgb
    from edge_build.runners import OnnxRunner, run_batched

    preprocessing = Preprocessing.from_dict(_metadata_preprocessing(fp32))
    val = list_split(data, "val")
    labels = np.array([ref.label for ref in val])
    pixels = np.stack([preprocessing.resize_rgb(load_rgb(ref.path)) for ref in val])
    floats = preprocessing.normalize(pixels)
    reference = run_batched(OnnxRunner(fp32), floats).argmax(1)
    rows = {"fp32": {"top1": round(float(np.mean(reference == labels)) * 100, 2), "agreement": 1.0}}
    for name, path in variants.items():
        runner = OnnxRunner(path)
        predicted = run_batched(runner, pixels if runner.input_format == "uint8_nhwc" else floats).argmax(1)
        rows[name] = {
            "top1": round(float(np.mean(predicted == labels)) * 100, 2),
            "agreement": round(float(np.mean(predicted == reference)), 4),
        }
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fp32 ONNX (opset >= 13) with edge-build metadata")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "garbage_26x100")
    parser.add_argument("--calibration", type=Path, default=REPO / "calibration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--bound", action="store_true", help="also time IOBinding / invoke-only (no feed overhead)")
    parser.add_argument("--only", default="", help="comma-separated variant names to time (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="keep the variants in this directory")
    parser.add_argument("--sizes", default="", help="also time the lite recipe at these input sizes, e.g. 192,160")
    parser.add_argument("--reuse", action="store_true", help="reuse the variants already in --work")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lite-probe-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        names = ("float_in", "u8_in", "u8_gap", "u8_gap_stem", "u8_gap_stem.ort")
        files = {name: work / (name if name.endswith(".ort") else f"{name}.onnx") for name in names}
        files["float_in"] = work / "qdq_False.onnx"
        if args.reuse and all(path.is_file() for path in files.values()):
            variants = files
        else:
            variants = build_variants(args.model, work, args.data, args.calibration)
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
        quality = accuracy(variants, args.model, args.data)
        subjects: dict[str, tuple] = {"litert": ("litert", None, 224, False)}
        subjects.update({name: ("ort", str(path), 224, False) for name, path in variants.items()})
        for size in [int(s) for s in args.sizes.split(",") if s]:
            path = build_lite_at(args.model, size, work, args.data, args.calibration)
            subjects[f"lite_{size}.ort"] = ("ort", str(path), size, False)
        if args.bound and "u8_gap_stem.ort" in variants:
            subjects["litert_invoke_only"] = ("litert", None, 224, True)
            subjects["u8_gap_stem.ort_bound"] = ("ort", str(variants["u8_gap_stem.ort"]), 224, True)
        load_before = f"{os.getloadavg()[0]:.2f}"
        timing = measure(subjects, args.threads, args.rounds, args.iters, args.warmup)

    import onnxruntime

    print(f"\nbatch 1, 224x224, {args.threads} threads, {args.rounds} interleaved rounds x {args.iters} runs")
    print(f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}")
    print(
        f"{'subject':22s} {'p10 ms':>7s} {'p10 x':>6s} {'p50 ms':>7s} {'p90 ms':>7s} {'p50 x':>6s} {'round x':>7s} "
        f"{'top-1':>6s} {'agree':>6s}"
    )
    for name, row in timing.items():
        q = quality.get(name, {})
        top1, agreement = q.get("top1", float("nan")), q.get("agreement", float("nan"))
        print(
            f"{name:22s} {row['p10_ms']:7.3f} {row['p10_ratio_to_litert']:6.3f} {row['p50_ms']:7.3f} "
            f"{row['p90_ms']:7.3f} {row['ratio_to_litert']:6.3f} {row['median_round_ratio']:7.3f} "
            f"{top1:6.2f} {agreement:6.3f}"
        )
    print(f"fp32 ONNX top-1 {quality['fp32']['top1']:.2f} % on the validation split")
    if args.json:
        payload = {
            "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
            "command": " ".join(["python", *sys.argv]),
            "onnxruntime": onnxruntime.__version__,
            "threads": args.threads,
            "load_average_before": float(load_before),
            "load_average_after": os.getloadavg()[0],
            "rounds": args.rounds,
            "iters": args.iters,
            "timing": timing,
            "accuracy": quality,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
