"""ONNX -> ORT format (the model format of ONNX Runtime Mobile / minimal builds).

Uses `onnxruntime.tools.convert_onnx_models_to_ort` (optimization style "Fixed": the
graph optimizations are applied once and baked in). Next to the `.ort` file it leaves
`<name>.required_operators.config`, the operator list a minimal ONNX Runtime build
for the device needs (`build.py --include_ops_by_config`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

from edge_build import atomic
from edge_build.errors import EdgeBuildError

#: "arm": no x86-only (NCHWc) layouts, int8 QDQ kept where ARM kernels want it; runs everywhere.
#: "amd64": adds the x86 NCHWc layout for fp32 convolutions (the .ort then needs an x86 CPU).
PLATFORMS = ("arm", "amd64")


def ort_config_path(ort_path: Path) -> Path:
    return ort_path.with_name(f"{ort_path.stem}.required_operators.config")


def convert_to_ort(onnx_path: Path, out_dir: Path, name: str | None = None, target_platform: str = "arm") -> Path:
    """Convert `onnx_path` to `out_dir/<name or stem>.ort` (atomically); returns the .ort path."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if target_platform not in PLATFORMS:
        raise EdgeBuildError(f"unknown ORT target platform '{target_platform}'", f"allowed: {', '.join(PLATFORMS)}")
    if not onnx_path.is_file():
        raise EdgeBuildError(f"ONNX model not found: {onnx_path}", "build it first (`edge-build export`/`quantize`)")
    target = out_dir / (name or f"{onnx_path.stem}.ort")
    with tempfile.TemporaryDirectory(prefix="edge-build-ort-") as scratch_dir:
        scratch = Path(scratch_dir)
        source = scratch / "in" / "model.onnx"
        source.parent.mkdir()
        shutil.copyfile(onnx_path, source)
        converted_dir = scratch / "out"
        log = io.StringIO()
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                convert_onnx_models_to_ort(
                    source,
                    output_dir=converted_dir,
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform=target_platform,
                )
        except Exception as exc:  # the tool re-raises whatever ORT raised
            raise EdgeBuildError(
                f"{onnx_path}: conversion to ORT format failed ({str(exc).splitlines()[0][:200]})",
                "the model must load in ONNX Runtime; check it with `edge-build verify`",
            ) from exc
        produced = sorted(converted_dir.glob("*.ort"))
        configs = sorted(converted_dir.glob("*.config"))
        if len(produced) != 1:
            raise EdgeBuildError(f"{onnx_path}: the ORT converter produced no .ort file", log.getvalue()[-300:])
        with atomic.atomic_path(target) as tmp:
            shutil.copyfile(produced[0], tmp)
        if configs:
            with atomic.atomic_path(ort_config_path(target)) as tmp:
                shutil.copyfile(configs[0], tmp)
    return target
