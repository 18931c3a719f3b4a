"""MindSpore Lite: a ready `converter_lite` post-training-quantization kit for the MindIR.

No `mindspore-lite` wheel exists for CPython 3.11, so the `.ms` model cannot be
produced or run here: what this module writes is UNTESTED on this machine. It is
what the user needs on their side: the converter configuration (full int8
quantization, per-channel weights, MAX_MIN activation ranges), the calibration
images as the raw binary input tensors the converter reads (`input_type=BIN`:
one float32 N,C,H,W tensor per file, already through the shared preprocessing),
and the exact command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_build import atomic
from edge_build.calibration import CalibrationSet
from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing

KIT_DIR = "mslite"
CONFIG_NAME = "converter_ptq.cfg"
SCRIPT_NAME = "convert.sh"
README_NAME = "README.md"
CALIBRATION_DIR = "calibration"


def mindir_input_name(mindir_path: Path) -> str:
    """The graph input's name as MindSpore wrote it (e.g. `..._construct_5:x` -> `x`)."""
    try:
        from mindspore.train import mind_ir_pb2
    except ImportError:  # MindSpore not installed: fall back to MindSpore's usual argument name
        return "x"
    model = mind_ir_pb2.ModelProto()
    try:
        model.ParseFromString(Path(mindir_path).read_bytes())
    except Exception as exc:  # protobuf DecodeError
        raise EdgeBuildError(f"{mindir_path}: not a MindIR file ({exc})", "rebuild it with `edge-build export`") from (
            exc
        )
    if len(model.graph.input) != 1:
        raise EdgeBuildError(f"{mindir_path}: expected one graph input, found {len(model.graph.input)}")
    return model.graph.input[0].name.rsplit(":", 1)[-1]


def _subset(calibration: CalibrationSet, per_class: int) -> list[int]:
    """Indices of the first `per_class` images of each class (the list is stratified already)."""
    taken: dict[str, int] = {}
    chosen = []
    for index, ref in enumerate(calibration.refs):
        if taken.get(ref.code, 0) < per_class:
            taken[ref.code] = taken.get(ref.code, 0) + 1
            chosen.append(index)
    return chosen


def config_text(input_name: str, count: int) -> str:
    return f"""# MindSpore Lite converter_lite: full int8 post-training quantization of the edge-build MindIR.
# Written by edge-build; UNTESTED here (no mindspore-lite for CPython 3.11). See README.md.
[common_quant_param]
quant_type=FULL_QUANT
bit_num=8

[data_preprocess_param]
# One raw float32 tensor (1,3,H,W, little endian) per file, preprocessing already applied.
calibrate_path={input_name}:{CALIBRATION_DIR}
calibrate_size={count}
input_type=BIN

[full_quant_param]
activation_quant_method=MAX_MIN
bias_correction=true
per_channel=true
"""


def command(mindir_name: str, input_name: str, size: int) -> str:
    return (
        f"converter_lite --fmk=MINDIR --modelFile=../{mindir_name} --outputFile=network_int8 "
        f'--configFile={CONFIG_NAME} --inputShape="{input_name}:1,3,{size},{size}"'
    )


def export_mslite_config(
    mindir_path: Path,
    calibration: CalibrationSet,
    preprocessing: Preprocessing,
    out_dir: Path,
    per_class: int = 1,
    input_name: str | None = None,
) -> list[Path]:
    """Write `out_dir/mslite/` (config, calibration .bin files, convert.sh, README.md); the paths written.

    `per_class` calibration images per class (1 keeps the kit about 15 MB at 224x224).
    The command expects the MindIR one level up (`../<name>.mindir`), as in a bundle.
    """
    mindir_path = Path(mindir_path)
    if not mindir_path.is_file():
        raise EdgeBuildError(f"MindIR not found: {mindir_path}", "run `edge-build export` first")
    kit = Path(out_dir) / KIT_DIR
    name = input_name or mindir_input_name(mindir_path)
    written = []
    indices = _subset(calibration, per_class)
    for number, index in enumerate(indices):
        ref = calibration.refs[index]
        tensor = preprocessing.prepare_batch([ref.path]).astype("<f4", copy=False)
        target = kit / CALIBRATION_DIR / f"{number:04d}_{ref.code}_{Path(ref.path.name).stem}.bin"
        written.append(atomic.write_bytes(target, np.ascontiguousarray(tensor).tobytes()))
    written.append(atomic.write_text(kit / CONFIG_NAME, config_text(name, len(indices))))
    cmd = command(mindir_path.name, name, preprocessing.size)
    script = (
        "#!/bin/sh\n"
        "# Convert the MindIR to an int8 MindSpore Lite model (network_int8.ms). UNTESTED by edge-build.\n"
        "# Needs MindSpore Lite's converter_lite on PATH (and its lib/ on LD_LIBRARY_PATH).\n"
        'set -e\ncd "$(dirname "$0")"\n'
        f"{cmd}\n"
    )
    written.append(atomic.write_text(kit / SCRIPT_NAME, script))
    (kit / SCRIPT_NAME).chmod(0o755)
    written.append(atomic.write_text(kit / README_NAME, _readme(mindir_path.name, name, len(indices), cmd)))
    return written


def _readme(mindir_name: str, input_name: str, count: int, cmd: str) -> str:
    return f"""# MindSpore Lite int8 conversion kit (untested here)

**Status: untested.** No `mindspore-lite` package exists for CPython 3.11, so edge-build
could neither run `converter_lite` nor load a `.ms` model on the machine that built this
bundle. Everything else in the bundle is verified; this folder is not.

What is here:

- `{CONFIG_NAME}`: full int8 quantization (`FULL_QUANT`, 8 bit, per-channel weights,
  `MAX_MIN` activation ranges, bias correction).
- `{CALIBRATION_DIR}/`: {count} calibration images from the committed calibration list
  (training split only), each a raw little-endian float32 tensor of shape (1, 3, H, W),
  already resized and scaled by the model's preprocessing (`x / 127.5 - 1`, RGB).
- `{SCRIPT_NAME}`: the command below.

```sh
cd mslite
{cmd}
```

The input tensor name `{input_name}` is read from `{mindir_name}`; if the converter reports
a different input name, use that name in `--inputShape` and in `calibrate_path`.
The `.ms` model takes the same input as the MindIR: float32 NCHW after preprocessing.
"""
