"""One benchmark subject in its own process, stepped by `edge_build.bench` over pipes.

Each artifact (and each reference runtime) is loaded in its own child so its load
time, memory and thread pools cannot pollute another's. The child stays alive for
the whole benchmark and waits, blocked on stdin, until the parent asks it for a
slice of runs; the parent steps one child at a time, so the children interleave
(A B A B ...) and never compete for the cores.

Protocol: the parent writes one JSON spec line, the child answers one JSON line
("ready" with load figures), then each JSON request line gets one JSON answer line.
The child's own stdout is redirected to stderr first, so a library that prints
cannot corrupt the protocol. Requests:

- ``{"op": "warmup", "batch": B, "runs": N, "max_time_s": M, "images": path|null}``
- ``{"op": "measure", "batch": B, "runs": N, "min_time_s": T, "max_time_s": M, "images": ...}``
  -> ``{"times_ns": [...]}`` (one wall-clock time per `runner.run(batch)` call)
- ``{"op": "memory"}`` -> peak resident set size so far
- ``{"op": "accuracy", "images": path, "batch": B}`` -> top-1 predictions
- ``{"op": "quit"}``
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing
from edge_build.runners import FLOAT_NCHW, UINT8_NHWC, Runner

#: Runtimes a spec may name, besides "factory" (a `module:function` returning a Runner).
RUNTIMES = ("onnxruntime", "mindir", "litert", "factory")


def peak_rss_kb() -> int:
    """Peak resident set size of this process so far, in KiB.

    Linux: VmHWM of the process's own memory map. Not `ru_maxrss`, which after
    fork/vfork + exec starts from the parent's resident size (the kernel carries the old
    map's high-water mark over), so a big parent would show up in every child.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


class LiteRTRunner:
    """A `.tflite` model in LiteRT (XNNPACK, the interpreter's default delegate).

    The reference MobileNetV2's graph has a fixed batch of 1 (its final reshape cannot be
    resized), so a batch of N runs as N batch-1 invokes: what a mobile app does.
    """

    input_format = UINT8_NHWC
    static_batch = 1

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.name = self.path.name
        if not self.path.is_file():
            raise EdgeBuildError(f"LiteRT reference model not found: {self.path}", "check the shared weights folder")
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        if self._input["dtype"] != np.uint8:
            raise EdgeBuildError(f"{self.path}: expected a uint8 input, found {self._input['dtype']}")
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self._scale, self._zero = self._output["quantization"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = []
        for image in batch:
            self.interpreter.set_tensor(self._input["index"], image[None])
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self._output["index"])[0])
        out = np.stack(outputs).astype(np.float32)
        return (out - self._zero) * self._scale if self._scale else out


def mindspore_runner(cell: Any, size: int, threads: int) -> Runner:
    """A MindSpore network on the CPU with the profile's thread count, in its speed configuration:
    BatchNorm folded by `network.fold_batchnorm`, whose cells compile a shape once it has carried
    `network.COMPILE_AFTER_IMAGES` images; the child's warm-up runs past that point."""
    from edge_build.msenv import mindspore_module
    from edge_build.network import COMPILE_AFTER_IMAGES
    from edge_build.runners import MindSporeRunner

    set_mindspore_threads(mindspore_module(), threads)
    runner = MindSporeRunner(cell, name="mindspore")
    runner.input_shape = (3, size, size)  # type: ignore[attr-defined]
    runner.warmup_images = COMPILE_AFTER_IMAGES  # type: ignore[attr-defined]
    return runner


def mindspore_reference(build_dir: str, threads: int) -> Runner:
    """The trained network, BatchNorm folded (the speed configuration), on the CPU."""
    from edge_build.msenv import mindspore_module
    from edge_build.trained import load_trained

    set_mindspore_threads(mindspore_module(), threads)
    model = load_trained(Path(build_dir))
    return mindspore_runner(model.network(fold_bn=True), model.preprocessing.size, threads)


_MS_THREADS: list[int] = []


def set_mindspore_threads(ms: Any, threads: int) -> None:
    """MindSpore's CPU kernels default to 25 threads; a subject must use the profile's count.
    MindSpore accepts the setting once per process, before the first kernel runs."""
    if not _MS_THREADS:
        ms.device_context.cpu.op_tuning.threads_num(threads)
        _MS_THREADS.append(threads)
    elif _MS_THREADS[0] != threads:
        raise EdgeBuildError(f"MindSpore already runs {_MS_THREADS[0]} threads in this process, not {threads}")


def _open(spec: dict[str, Any]) -> Runner:
    runtime = spec["runtime"]
    threads = int(spec["threads"])
    if runtime == "onnxruntime":
        from edge_build.runners import OnnxRunner

        return OnnxRunner(Path(spec["path"]), threads=threads, providers=tuple(spec["providers"]))
    if runtime == "mindir":
        from edge_build.msenv import mindspore_module
        from edge_build.runners import MindIRRunner

        set_mindspore_threads(mindspore_module(), threads)
        return MindIRRunner(Path(spec["path"]))
    if runtime == "litert":
        return LiteRTRunner(Path(spec["path"]), threads)
    if runtime == "factory":
        module_name, _, attribute = spec["factory"].partition(":")
        function = getattr(importlib.import_module(module_name), attribute)
        return function(**spec.get("args", {}))
    raise EdgeBuildError(f"unknown benchmark runtime '{runtime}'", f"allowed: {', '.join(RUNTIMES)}")


def describe_input(runner: Runner, default_size: int) -> tuple[tuple[int, ...], int | None]:
    """(per-image input shape in the runner's layout, static batch size or None)."""
    session = getattr(runner, "session", None)
    if session is not None:  # ONNX Runtime: read the graph's declared input
        dims = session.get_inputs()[0].shape
        static = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        per_image = tuple(d if isinstance(d, int) and d > 0 else default_size for d in dims[1:])
        return per_image, static
    shape = getattr(runner, "input_shape", None)
    if shape is None:
        size = default_size
        shape = (3, size, size) if runner.input_format == FLOAT_NCHW else (size, size, 3)
    return tuple(int(d) for d in shape), getattr(runner, "static_batch", None)


class Subject:
    """The loaded runner plus its inputs, answering the parent's requests."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.preprocessing = Preprocessing.from_dict(spec.get("preprocessing") or {})
        self.baseline_rss_kb = peak_rss_kb()
        start = time.perf_counter()
        self.runner = _open(spec)
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.rss_after_load_kb = peak_rss_kb()
        self.input_shape, self.static_batch = describe_input(self.runner, self.preprocessing.size)
        self.first_run_ms: float | None = None
        self._inputs: dict[tuple[str | None, int], np.ndarray] = {}

    def ready(self) -> dict[str, Any]:
        session = getattr(self.runner, "session", None)
        return {
            "name": getattr(self.runner, "name", ""),
            "input_format": self.runner.input_format,
            "input_shape": list(self.input_shape),
            "static_batch": self.static_batch,
            "providers": session.get_providers() if session is not None else [],
            "load_ms": self.load_ms,
            "baseline_rss_kb": self.baseline_rss_kb,
            "rss_after_load_kb": self.rss_after_load_kb,
        }

    def image_size(self) -> int:
        return self.input_shape[1] if self.runner.input_format == FLOAT_NCHW else self.input_shape[0]

    def _to_runner_format(self, rgb: np.ndarray) -> np.ndarray:
        if self.runner.input_format == UINT8_NHWC:
            return np.ascontiguousarray(rgb)
        return self.preprocessing.normalize(rgb)

    def _batch(self, images: str | None, batch: int) -> np.ndarray:
        """The first `batch` validation images (or a fixed random batch), in the runner's format."""
        key = (images, batch)
        if key not in self._inputs:
            if images:
                pool = np.load(images, mmap_mode="r", allow_pickle=False)
                rgb = np.asarray(pool[np.arange(batch) % len(pool)])
            else:
                size = self.image_size()
                rgb = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            self._inputs[key] = self._to_runner_format(rgb)
        return self._inputs[key]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One call as the runtime allows it: whole batch, or fixed-size chunks for a static batch."""
        step = self.static_batch
        if not step or step == len(x):
            return self.runner.run(x)
        outputs = []
        for start in range(0, len(x), step):
            part = x[start : start + step]
            pad = step - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            outputs.append(self.runner.run(part)[: step - pad])
        return np.concatenate(outputs)

    def warmup(self, request: dict[str, Any]) -> dict[str, Any]:
        batch = int(request["batch"])
        x = self._batch(request.get("images"), batch)
        # A runtime that compiles a shape after N images (MindSpore) must get there before timing.
        compile_runs = math.ceil(getattr(self.runner, "warmup_images", 0) / batch) + 1 if batch else 0
        deadline = time.perf_counter() + float(request.get("max_time_s", 1e9))
        runs = 0
        while runs < max(1, int(request["runs"]), compile_runs):
            start = time.perf_counter_ns()
            self._run(x)
            runs += 1
            if self.first_run_ms is None:
                self.first_run_ms = (time.perf_counter_ns() - start) / 1e6
            if runs >= compile_runs and time.perf_counter() > deadline:
                break
        return {"first_run_ms": self.first_run_ms, "runs": runs}

    def measure(self, request: dict[str, Any]) -> dict[str, Any]:
        x = self._batch(request.get("images"), int(request["batch"]))
        runs = max(1, int(request["runs"]))
        min_ns = float(request.get("min_time_s", 0.0)) * 1e9
        max_ns = float(request.get("max_time_s", 1e9)) * 1e9
        times: list[int] = []
        total = 0
        while (len(times) < runs or total < min_ns) and not (times and total >= max_ns):
            start = time.perf_counter_ns()
            self._run(x)
            elapsed = time.perf_counter_ns() - start
            times.append(elapsed)
            total += elapsed
        return {"times_ns": times}

    def accuracy(self, request: dict[str, Any]) -> dict[str, Any]:
        pool = np.load(request["images"], mmap_mode="r", allow_pickle=False)
        batch = int(request["batch"])
        predictions: list[int] = []
        classes = None
        for start in range(0, len(pool), batch):
            logits = self._run(self._to_runner_format(np.asarray(pool[start : start + batch])))
            classes = logits.shape[-1]
            predictions.extend(int(i) for i in np.argmax(logits.reshape(len(logits), -1), axis=1))
        return {"predictions": predictions, "classes": classes}

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "warmup":
            return self.warmup(request)
        if op == "measure":
            return self.measure(request)
        if op == "memory":
            return {"peak_rss_kb": peak_rss_kb()}
        if op == "accuracy":
            return self.accuracy(request)
        raise EdgeBuildError(f"benchmark child: unknown request '{op}'")


# --- the parent's side of the protocol -------------------------------------------------------------

PARENT_ENV = "EDGE_BUILD_BENCH_PARENT"
#: Seconds a child may take to answer one request (MindSpore's import and a full val pass included).
REQUEST_TIMEOUT_S = 900.0


class Child:
    """One running `python -m edge_build.bench_child`, answering JSON requests line by line.

    With `freeze`, the child is stopped (SIGSTOP) whenever it is not answering a request:
    runtimes keep threads busy after a call (ONNX Runtime's spinning workers, MindSpore's
    actor threads), and a waiting child must not take cycles from the one being measured.
    The child asks the kernel to kill it when the parent dies (PR_SET_PDEATHSIG), so a parent
    killed with `kill -9` never leaves a stopped child behind.
    """

    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str], freeze: bool = True) -> None:
        import psutil

        self.name = name
        self.freeze = freeze and hasattr(signal, "SIGSTOP")
        self._stopped = False
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_build.bench_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**env, PARENT_ENV: str(os.getpid())},
        )
        self._ps = psutil.Process(self.process.pid)
        #: CPU seconds the child used while answering requests (the rest ran while it should wait).
        self.busy_cpu_s = 0.0
        self.ready = self._send({**spec, "python_path": [p for p in sys.path if p]})

    def _signal(self, stop: bool) -> None:
        if self.process.poll() is None and self._stopped != stop:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGSTOP if stop else signal.SIGCONT)
            self._stopped = stop

    def cpu_s(self) -> float:
        try:
            times = self._ps.cpu_times()
        except Exception:  # the process is gone: nothing more to count
            return 0.0
        return times.user + times.system

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-400:]

    def _send(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self._signal(stop=False)
        cpu_before = self.cpu_s()
        with contextlib.suppress(BrokenPipeError):  # a dead child is reported by the read below
            self.process.stdin.write((json.dumps(payload) + "\n").encode("utf-8"))
            self.process.stdin.flush()
        answered, _, _ = select.select([self.process.stdout], [], [], REQUEST_TIMEOUT_S)
        line = self.process.stdout.readline() if answered else b""
        if not line:
            tail = self._stderr_tail()
            self.close()
            why = "timed out" if not answered else f"exited with code {self.process.poll()}"
            raise EdgeBuildError(
                f"benchmark of '{self.name}' failed: its process {why} ({tail or 'no output'})",
                "run the artifact alone with `edge-build verify` to see the error",
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            self.close()
            raise EdgeBuildError(f"benchmark of '{self.name}': {reply.get('error')}", reply.get("hint"))
        self.busy_cpu_s += self.cpu_s() - cpu_before
        if self.freeze:
            self._signal(stop=True)
        return reply

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        return self._send({"op": op, **args})

    def close(self) -> None:
        self._signal(stop=False)
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.process.stdin is not None
                self.process.stdin.write(b'{"op": "quit"}\n')
                self.process.stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self._stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: same thread count for every runtime, this checkout importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)  # OpenMP (MindSpore's oneDNN) reads it at start
    env.setdefault("GLOG_v", "3")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _reply(channel: BinaryIO, payload: dict[str, Any]) -> None:
    channel.write((json.dumps(payload) + "\n").encode("utf-8"))
    channel.flush()


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, EdgeBuildError):
        return {"ok": False, "error": exc.message, "hint": exc.hint}
    return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"}


def _die_with_parent() -> None:
    """Be killed (SIGKILL works on a stopped process too) when the parent process dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.environ.get(PARENT_ENV) and os.getppid() != int(os.environ[PARENT_ENV]):
        os._exit(1)  # the parent died before the request above took effect


def main() -> int:
    _die_with_parent()
    # Keep the protocol channel private: anything printed by a library goes to stderr.
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    spec = json.loads(sys.stdin.readline())
    for entry in reversed(spec.get("python_path", [])):
        sys.path.insert(0, entry)
    try:
        subject = Subject(spec)
    except BaseException as exc:  # report every load failure to the parent, which names the artifact
        _reply(channel, _failure(exc))
        return 1
    _reply(channel, {"ok": True, **subject.ready()})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            _reply(channel, {"ok": True, **subject.handle(request)})
        except Exception as exc:  # the parent turns this into an error naming the artifact
            _reply(channel, _failure(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
