"""The parity gate and its fault injection: every planted fault fails with a diagnosis naming it."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from export_nets import PREPROCESSING, SIZE, folded, random_images, tiny_classifier
from onnx import numpy_helper
from PIL import Image

from edge_build import onnx_graph, verify
from edge_build.export import export_artifacts
from edge_build.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def reference():
    """The network as trained (BatchNorm form): the artifacts come from its folded twin."""
    return tiny_classifier(seed=0, batch_norm=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reference) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    return export_artifacts(
        folded(reference), {"weights_sha256": "0" * 64}, out, softmax=True, embed_preprocessing=True,
        preprocessing=PREPROCESSING,
    )  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for index, pixels in enumerate(random_images(10, seed=5)):
        path = directory / f"{index:02d}.png"
        Image.fromarray(np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)).save(path)  # 64x64: resized to 32
        paths.append(path)
    return paths


def check(reference, artifacts: dict[str, Path], images: list[Path]) -> dict:
    report = verify.verify_artifacts(reference, artifacts, images, PREPROCESSING)
    payload = report.as_dict()
    json.dumps(payload)  # JSON-able as it is
    return payload


def planted(source: Path, tmp_path: Path, edit) -> Path:
    """A copy of an ONNX artifact with `edit(model)` applied."""
    model = onnx.load(str(source))
    edit(model)
    target = tmp_path / source.name
    onnx.save(model, str(target))
    return target


def test_correct_export_passes_every_check(reference, exported, images):
    payload = check(reference, exported, images)
    assert payload["verdict"] == "pass" and verify.exit_code(payload) == 0
    by_kind = {a["kind"]: a for a in payload["artifacts"]}
    assert set(by_kind) == {"mindir", "onnx_fp32", "onnx_fp32_softmax", "onnx_fp32_uint8"}
    assert by_kind["mindir"]["outputs"][0]["max_abs"] <= 1e-5
    for kind in ("onnx_fp32", "onnx_fp32_softmax", "onnx_fp32_uint8"):
        logits = by_kind[kind]["outputs"][0]
        assert logits["output"] == "logits" and logits["max_abs"] <= 1e-4
        assert logits["top1_agreement"] == 1.0 and logits["cosine_min"] > 0.999999
    assert [o["output"] for o in by_kind["onnx_fp32_uint8"]["outputs"]] == ["logits", "probabilities"]
    assert by_kind["onnx_fp32_uint8"]["preprocessing"] == "the artifact's metadata"
    assert "PASS: 4 artifacts on 10 images" in verify.render_table(payload)


def test_perturbed_weight_is_localized_to_its_layer(reference, exported, images, tmp_path):
    model = onnx.load(str(exported["onnx_fp32"]))
    conv = [node for node in model.graph.node if node.op_type == "Conv"][4]  # the residual block's depthwise
    weight_name = conv.input[1]

    def perturb(model: onnx.ModelProto) -> None:
        init = next(i for i in model.graph.initializer if i.name == weight_name)
        weight = numpy_helper.to_array(init).copy()
        weight[3] += 0.05  # one channel's 3x3 kernel
        init.CopyFrom(numpy_helper.from_array(weight, weight_name))

    broken = planted(exported["onnx_fp32"], tmp_path, perturb)
    payload = check(reference, {"onnx_fp32": broken}, images)
    assert verify.exit_code(payload) == 1
    (artifact,) = payload["artifacts"]
    first_bad = artifact["localization"]["first_bad"]
    assert first_bad["index"] == 4
    assert first_bad["mindspore_cell"] == "stages.2.block.3"  # conv of conv+BN: the BN is folded in
    assert first_bad["onnx_weight"] == weight_name and first_bad["onnx_node"] == conv.name
    assert all(layer["rel_err"] < 1e-5 for layer in artifact["localization"]["layers"][:4])
    assert f"'{weight_name}'" in " ".join(artifact["diagnosis"])
    assert not artifact["localization"]["pad_mismatches"]


def test_pad_order_bug_is_named(reference, exported, images, tmp_path):
    broken = planted(exported["onnx_fp32"], tmp_path, onnx_graph.fix_pad_order)  # a second swap = MindSpore's order
    payload = check(reference, {"onnx_fp32": broken}, images)
    assert verify.exit_code(payload) == 1
    (artifact,) = payload["artifacts"]
    localization = artifact["localization"]
    assert localization["first_bad"]["index"] == 0
    pads = localization["pad_mismatches"]
    assert len(pads) == 3 and all(p["mindspore_order"] for p in pads)
    assert pads[0]["onnx_pads"] == [0, 1, 0, 1] and pads[0]["expected_onnx_pads"] == [0, 0, 1, 1]
    assert "(top, bottom, left, right) order copied as is" in " ".join(artifact["diagnosis"])


def test_bgr_declared_in_metadata_is_diagnosed(reference, exported, images, tmp_path):
    bgr = Preprocessing(size=SIZE, channel_order="BGR").as_dict()
    broken = planted(
        exported["onnx_fp32"], tmp_path, lambda m: onnx_graph.set_metadata(m, {"edge_build.preprocessing": bgr})
    )
    payload = check(reference, {"onnx_fp32": broken}, images)
    assert verify.exit_code(payload) == 1
    diagnosis = " ".join(payload["artifacts"][0]["diagnosis"])
    assert "channel_order='BGR' (the network's weights expect 'RGB')" in diagnosis
    assert "as BGR (red and blue channels swapped)" in diagnosis
    assert payload["artifacts"][0]["localization"] is None  # explained by the input: no layer is blamed


def _embedded(exported: dict[str, Path], tmp_path: Path, preprocessing: Preprocessing, **overrides) -> Path:
    """The float model with a (deliberately wrong) preprocessing embedded, metadata still saying RGB x/127.5-1."""

    def embed(model: onnx.ModelProto) -> None:
        onnx_graph.embed_preprocessing(model, preprocessing, **overrides)

    return planted(exported["onnx_fp32"], tmp_path, embed)


def test_bgr_inside_the_graph_is_diagnosed(reference, exported, images, tmp_path):
    broken = _embedded(exported, tmp_path, Preprocessing(size=SIZE, channel_order="BGR"))
    payload = check(reference, {"onnx_fp32_uint8": broken}, images)
    assert verify.exit_code(payload) == 1
    diagnosis = " ".join(payload["artifacts"][0]["diagnosis"])
    assert "as BGR (red and blue channels swapped)" in diagnosis
    assert "metadata declares" not in diagnosis


def test_imagenet_normalization_is_diagnosed(reference, exported, images, tmp_path):
    mean, std = verify.IMAGENET_MEAN, verify.IMAGENET_STD
    broken = _embedded(exported, tmp_path, PREPROCESSING, scale=1 / (255 * std), offset=-mean / std)
    payload = check(reference, {"onnx_fp32_uint8": broken}, images)
    assert verify.exit_code(payload) == 1
    diagnosis = " ".join(payload["artifacts"][0]["diagnosis"])
    assert "normalized with ImageNet mean/std" in diagnosis and "BGR" not in diagnosis


@pytest.mark.parametrize("kind", ["onnx_fp32", "mindir"])
def test_truncated_artifact_is_a_clear_error(reference, exported, images, tmp_path, kind):
    source = exported[kind]
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    if kind == "mindir":
        shutil.copy(source.with_name(source.name + ".json"), tmp_path)
    payload = check(reference, {kind: broken, "onnx_fp32_softmax": exported["onnx_fp32_softmax"]}, images)
    assert verify.exit_code(payload) == 2 and payload["verdict"] == "error"
    failed, fine = payload["artifacts"]
    assert failed["status"] == "error" and fine["status"] == "pass"  # the rest is still checked
    assert str(broken) in failed["error"] and "truncated" in failed["error"]
    assert "ERROR" in verify.render_table(payload)


def test_missing_artifact_is_a_clear_error(reference, images, tmp_path):
    payload = check(reference, {"onnx_fp32": tmp_path / "nope.onnx"}, images)
    assert verify.exit_code(payload) == 2
    assert "not found" in payload["artifacts"][0]["error"]


def test_junit_and_markdown_render_failures(reference, exported, images, tmp_path):
    broken = planted(exported["onnx_fp32"], tmp_path, onnx_graph.fix_pad_order)
    payload = check(reference, {"onnx_fp32": broken, "mindir": exported["mindir"]}, images)
    suite = ET.fromstring(verify.junit_xml(payload))
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    assert ("parity.onnx_fp32", "logits.max_abs") in cases and ("parity.mindir", "logits.top1_agreement") in cases
    failure = cases[("parity.onnx_fp32", "logits.max_abs")].find("failure")
    assert failure is not None and "pads" in failure.text
    assert cases[("parity.mindir", "logits.max_abs")].find("failure") is None
    assert int(suite.get("failures")) >= 1 and int(suite.get("tests")) == len(cases)
    text = verify.markdown(payload)
    assert text.startswith("### ❌ edge-build verify: fail") and "| onnx_fp32 | logits |" in text


def test_tolerances_by_kind_and_precision():
    assert verify.tolerance_for("onnx_fp32").max_abs == 1e-4
    assert verify.tolerance_for("onnx_fp32_uint8").max_abs == 1e-4
    assert verify.tolerance_for("mindir").max_abs == 1e-5
    assert verify.tolerance_for("ort_int8").min_cosine is not None
    assert verify.precision_of("onnx_int8") == "int8" and verify.precision_of("onnx_fp16") == "fp16"
    custom = verify.Tolerance(max_abs=0.5)
    assert verify.tolerance_for("onnx_fp32", {"fp32": custom}) is custom
    assert verify.tolerance_for("onnx_fp32", {"onnx_fp32": custom, "fp32": verify.Tolerance()}) is custom


def test_compare_statistics_are_exact():
    want = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    got = want + np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 2.5]], dtype=np.float32)
    result = verify.compare("logits", got, want, ["a.jpg", "b.jpg"], verify.Tolerance(max_abs=1.0))
    assert result.max_abs == 2.5 and result.worst_image == "b.jpg"
    assert result.top1_agreement == 0.5 and result.top1_disagreements == 1
    assert result.mean_abs == pytest.approx(3.0 / 6)
    assert not result.passed and len(result.failures) == 2  # max abs and top-1
    nan = verify.compare("logits", want * np.nan, want, ["a.jpg", "b.jpg"], verify.Tolerance(max_abs=1.0))
    assert not nan.passed and "non-finite" in nan.failures[0]
