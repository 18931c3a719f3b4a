"""The short README.md that travels in every bundle: what is in it and how to run it."""

from __future__ import annotations

from typing import Any

from edge_build.preprocessing import Preprocessing

_MSLITE_NOTE = """\
## MindSpore Lite (untested here)

`mslite/` holds a ready `converter_lite` configuration for MindSpore Lite's
post-training quantization, the calibration images in the binary layout that
converter expects, and the exact command (`mslite/README.md`). No
`mindspore-lite` package exists for CPython 3.11, so edge-build could neither
produce nor run the `.ms` model: this path is untested. The MindIR itself is
verified against the MindSpore network (see `parity.json`).
"""


def bundle_readme(
    profile: Any, artifacts: dict[str, str], preprocessing: Preprocessing, metrics: dict[str, Any]
) -> str:
    lines = [
        f"# Garbage classifier — target `{profile.name}`",
        "",
        f"{profile.description}. Built by edge-build; every file is listed with its sha256 in",
        "`manifest.json` (`edge-build check-bundle DIR` re-verifies them).",
        "",
        "## Files",
        "",
    ]
    for kind, name in sorted(artifacts.items()):
        lines.append(f"- `{name}`: {kind}")
    lines += [
        "- `labels.json`: the 26 classes in output order (code, English, Chinese, bin)",
        "- `preprocessing.json`: what the float models expect",
        "- `parity.json`, `bench.json`, `eval.json`: verification, latency and accuracy results",
        "- `report.html` / `report.md`: the build report",
        "",
        "## Input",
        "",
        f"Float models (`input`, NCHW float32): RGB, the whole image resized to {preprocessing.size}x"
        f"{preprocessing.size} ({preprocessing.resize}), "
        f"then `x * {preprocessing.scale:.10g} + {preprocessing.offset:g}`.",
        f"Models whose input is uint8 take raw RGB pixels, NHWC, {preprocessing.size}x{preprocessing.size}: "
        "the scaling is inside the graph.",
        "Output `logits` (N, 26); index i is class i of `labels.json`.",
        "",
        "## Run with ONNX Runtime",
        "",
        "```python",
        "import json, numpy as np, onnxruntime as ort",
        "from PIL import Image",
        "labels = json.load(open('labels.json'))",
        f"session = ort.InferenceSession('{_first(artifacts, ('ort_int8', 'onnx_int8', 'onnx_fp32'))}')",
        "inp = session.get_inputs()[0]",
        f"rgb = np.asarray(Image.open('photo.jpg').convert('RGB').resize(({preprocessing.size}, {preprocessing.size}),"
        " Image.BILINEAR))",
        "x = rgb[None] if inp.type == 'tensor(uint8)' else "
        f"(rgb.astype(np.float32) * {preprocessing.scale:.10g} + {preprocessing.offset:g}).transpose(2, 0, 1)[None]",
        "logits = session.run(None, {inp.name: x})[0][0]",
        "best = labels[int(logits.argmax())]",
        "print(best['english'], best['chinese'], '->', best['bin'])",
        "```",
        "",
    ]
    if metrics:
        lines += ["## Headline metrics", ""]
        lines += [f"- {key}: {value}" for key, value in metrics.items()]
        lines.append("")
    if "mindir" in artifacts and profile.name == "lite":
        lines.append(_MSLITE_NOTE)
    return "\n".join(lines)


def _first(artifacts: dict[str, str], kinds: tuple[str, ...]) -> str:
    for kind in kinds:
        if kind in artifacts:
            return artifacts[kind]
    return next(iter(artifacts.values()), "model.onnx")
