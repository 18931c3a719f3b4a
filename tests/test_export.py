"""`edge-build export` and `verify` as stages and commands: artifacts, metadata, caching, exit codes."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from export_nets import PREPROCESSING, SIZE, folded, forward, random_images, tiny_classifier
from PIL import Image

from edge_build import export, onnx_graph, stages, taxonomy
from edge_build.cli import main
from edge_build.errors import CheckFailed
from edge_build.runners import MindIRRunner, OnnxRunner

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="module")
def network():
    return folded(tiny_classifier(seed=0, batch_norm=True))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, network) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("build") / "export"
    metadata = {"weights_sha256": "ab" * 32, "data_sha256": "cd" * 32}
    return export.export_artifacts(
        network, metadata, out, softmax=True, embed_preprocessing=True, preprocessing=PREPROCESSING
    )


def test_artifact_files_and_listing(artifacts):
    assert {kind: path.name for kind, path in artifacts.items()} == {
        "mindir": "network.mindir",
        "onnx_fp32": "network.onnx",
        "onnx_fp32_softmax": "network_softmax.onnx",
        "onnx_fp32_uint8": "network_uint8.onnx",
    }
    directory = artifacts["onnx_fp32"].parent
    assert export.read_artifacts(directory) == artifacts
    assert export.find_artifacts(directory.parent) == artifacts
    listing = json.loads((directory / export.ARTIFACTS_FILE).read_text())
    assert listing["artifacts"]["onnx_fp32_uint8"] == {
        "file": "network_uint8.onnx",
        "input_format": "uint8_nhwc",
        "outputs": ["logits", "probabilities"],
    }


def test_onnx_is_opset_17_dynamic_batch_named_and_checked(artifacts, network):
    model = onnx.load(str(artifacts["onnx_fp32"]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == onnx_graph.TARGET_OPSET >= 13
    session = ort.InferenceSession(str(artifacts["onnx_fp32"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape, out.name, out.shape) == ("input", ["batch", 3, SIZE, SIZE], "logits", ["batch", 5])
    pixels = random_images(3, seed=9)
    got = session.run(None, {"input": PREPROCESSING.normalize(pixels)})[0]
    assert np.abs(got - forward(network, pixels)).max() < 1e-5


def test_metadata_travels_inside_every_artifact(artifacts):
    meta = onnx_graph.read_metadata(artifacts["onnx_fp32_uint8"])
    labels = meta["edge_build.labels"]
    assert len(labels) == taxonomy.NUM_CLASSES == 26
    assert labels[0] | {} == taxonomy.CLASSES[0].as_dict()
    assert labels[21]["chinese"] == "药片胶囊" and labels[21]["bin"] == "hazardous"
    assert meta["edge_build.preprocessing"]["scale"] == PREPROCESSING.scale
    assert meta["edge_build.preprocessing"]["channel_order"] == "RGB"
    assert meta["edge_build.input"]["format"] == "uint8_nhwc" and meta["edge_build.input"]["preprocessing_in_graph"]
    assert meta["edge_build.model"] == {"weights_sha256": "ab" * 32, "data_sha256": "cd" * 32}
    assert meta["edge_build.version"] and meta["edge_build.git_commit"]
    sidecar = json.loads(export.sidecar_path(artifacts["mindir"]).read_text(encoding="utf-8"))
    assert sidecar["edge_build.labels"] == labels and sidecar["edge_build.input"]["format"] == "float_nchw"


def test_variants_compute_the_same_network(artifacts, network):
    pixels = random_images(4, seed=11)
    want = forward(network, pixels)
    logits, probabilities = OnnxRunner(artifacts["onnx_fp32_uint8"]).run_all(pixels).values()
    assert np.abs(logits - want).max() < 1e-5
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    mindir = MindIRRunner(artifacts["mindir"]).run(PREPROCESSING.normalize(pixels))  # dynamic batch of 4
    assert np.abs(mindir - want).max() < 1e-5


def test_backbone_export_gives_features(tmp_path, network):
    path = export.export_backbone_onnx(network, tmp_path / "backbone.onnx", size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["features"]
    assert session.get_inputs()[0].shape[0] == "batch"


def test_export_refuses_a_graph_that_disagrees(tmp_path, network, monkeypatch):
    monkeypatch.setattr(onnx_graph, "fix_pad_order", lambda model: [])  # MindSpore's pad order left in
    with pytest.raises(CheckFailed, match=r"differs from the MindSpore network"):
        export.export_onnx(network, tmp_path / "bad.onnx", SIZE)
    assert list(tmp_path.iterdir()) == []  # nothing published, no temporary file left


# --- stages and commands, with a stand-in for the training issue's TrainedModel -------------------


@dataclass
class FakeTrained:
    checkpoint: Path
    metadata: dict
    preprocessing: object = PREPROCESSING
    seed: int = 0

    def network(self, fold_bn: bool = True, softmax: bool = False):
        net = tiny_classifier(seed=self.seed, batch_norm=True)
        return folded(net, seed=self.seed) if fold_bn else net


@pytest.fixture
def build(tmp_path, monkeypatch) -> Path:
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    checkpoint = build_dir / "network.ckpt"
    checkpoint.write_bytes(b"seed 0")
    trained = FakeTrained(checkpoint, {"weights_sha256": "ab" * 32})
    monkeypatch.setitem(sys.modules, "edge_build.trained", types.SimpleNamespace(load_trained=lambda _dir: trained))
    return build_dir


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    for index, pixels in enumerate(random_images(6, seed=21)):
        folder = root / "val" / taxonomy.CODES[index % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def test_export_stage_is_cached(build):
    first = export.stage(build)
    runs = len(stages.EXECUTIONS)
    assert export.stage(build) == first and len(stages.EXECUTIONS) == runs
    (build / "network.ckpt").write_bytes(b"retrained")
    export.stage(build)
    assert len(stages.EXECUTIONS) == runs + 1
    assert set(export.stage(build, softmax=True)) == {"mindir", "onnx_fp32", "onnx_fp32_softmax"}


def test_verify_command_pass_fail_and_error(build, data, tmp_path):
    cli = CliRunner()
    paths = ["--build", str(build), "--data", str(data)]
    result = cli.invoke(main, ["export", "--build", str(build), "--embed-preprocessing"])
    assert result.exit_code == 0, result.output
    junit = tmp_path / "parity.xml"
    result = cli.invoke(main, ["verify", *paths, "--junit-xml", str(junit), "--markdown", str(tmp_path / "p.md")])
    assert result.exit_code == 0, result.output
    assert "PASS: 3 artifacts on 6 images" in result.output
    parity = json.loads((build / "verify" / "parity.json").read_text())
    assert parity["schema"] == 1 and parity["verdict"] == "pass" and parity["images"]["count"] == 6
    assert parity["reference"]["fold_check"]["max_abs"] <= 1e-4
    assert 'failures="0"' in junit.read_text() and "✅" in (tmp_path / "p.md").read_text()
    runs = len(stages.EXECUTIONS)
    summary = tmp_path / "summary.md"
    summary.write_text("## earlier step\n", encoding="utf-8")
    result = cli.invoke(
        main, ["verify", *paths, "--json", "--github-summary"], env={"GITHUB_STEP_SUMMARY": str(summary)}
    )
    assert result.exit_code == 0 and len(stages.EXECUTIONS) == runs  # unchanged inputs: the cached verdict
    assert json.loads(result.stdout)["verdict"] == "pass"
    assert summary.read_text(encoding="utf-8").startswith("## earlier step\n### ✅ edge-build verify: pass")

    onnx_path = build / "export" / "network.onnx"
    model = onnx.load(str(onnx_path))
    onnx_graph.fix_pad_order(model)
    onnx.save(model, str(onnx_path))  # the artifact changed: verify runs again, and fails
    result = cli.invoke(main, ["verify", *paths, "--images", "3"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "pads" in result.output and "Traceback" not in result.output

    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    result = cli.invoke(main, ["verify", *paths, "--json"])
    assert result.exit_code == 2, result.output
    assert "truncated" in result.output
    assert not (build / "verify" / stages.RECORD_NAME).exists()  # "could not run" is never cached


def test_commands_have_help():
    for command in ("export", "verify"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "not built yet" not in result.output


def test_verify_target_requires_its_artifacts(build, data):
    targets = Path(__file__).resolve().parents[1] / "targets"
    args = ["verify", "--build", str(build), "--data", str(data), "--targets", str(targets), "--target", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "artifacts not built" in result.output and "onnx_int8" in result.output


def test_verify_without_artifacts_says_run_export(build, data):
    result = CliRunner().invoke(main, ["verify", "--build", str(build), "--data", str(data)])
    assert result.exit_code == 2 and "run `edge-build export` first" in result.output


@pytest.mark.slow
def test_real_network_export_passes_on_every_val_image_and_faults_are_localized(tmp_path):
    """MobileNetV2 with the imported TF weights (TF-SAME pads) and a fixed head: all 130 val images pass;
    a perturbed layer and the pad-order bug are each found and named on the real graph."""
    weights = SHARED / "weights/mobilenet_v2_1.0_224_quant.tflite"
    data = SHARED / "data/garbage_26x100"
    if not weights.exists() or not data.exists():
        pytest.skip("shared weights/data not present")
    from edge_build import network as net_module
    from edge_build import verify
    from edge_build.dataset import list_split
    from edge_build.msenv import mindspore_module
    from edge_build.weights import import_weights

    ms = mindspore_module()
    imported = import_weights(weights, tmp_path / "build")
    rng = np.random.default_rng(0)
    head = net_module.build_head(26)
    head.weight.set_data(ms.Tensor(rng.normal(0, 0.05, (26, 1280)).astype(np.float32)))
    head.bias.set_data(ms.Tensor(rng.normal(0, 0.1, 26).astype(np.float32)))
    classifier = net_module.build_classifier(imported.load_backbone(fold_bn=False), head)
    classifier.set_train(False)
    foldedcell = net_module.fold_batchnorm(classifier)
    artifacts = export.export_artifacts(
        foldedcell, {"weights_sha256": imported.sha256}, tmp_path / "export", preprocessing=imported.preprocessing
    )
    refs = list_split(data, "val")
    report = verify.verify_artifacts(
        foldedcell, artifacts, [r.path for r in refs], imported.preprocessing, names=[r.key for r in refs],
        batchnorm_cell=classifier,
    )  # fmt: skip
    payload = report.as_dict()
    assert payload["verdict"] == "pass", verify.render_table(payload)
    by_kind = {a["kind"]: a["outputs"][0] for a in payload["artifacts"]}
    assert by_kind["onnx_fp32"]["max_abs"] <= 1e-4 and by_kind["onnx_fp32"]["top1_agreement"] == 1.0
    assert by_kind["mindir"]["max_abs"] <= 1e-5
    assert payload["images"]["count"] == 130

    model = onnx.load(str(artifacts["onnx_fp32"]))
    conv = [node for node in model.graph.node if node.op_type == "Conv"][30]
    weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
    values = onnx.numpy_helper.to_array(weight).copy()
    values[5] *= 1.2
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(tmp_path / "perturbed.onnx"))
    onnx_graph.fix_pad_order(bugged := onnx.load(str(artifacts["onnx_fp32"])))
    onnx.save(bugged, str(tmp_path / "pads.onnx"))
    faults = {"perturbed": tmp_path / "perturbed.onnx", "pads": tmp_path / "pads.onnx"}
    few = [r.path for r in refs[::16]]
    report = verify.verify_artifacts(foldedcell, faults, few, imported.preprocessing).as_dict()
    perturbed, pads = report["artifacts"]
    assert perturbed["status"] == pads["status"] == "fail"
    assert perturbed["localization"]["first_bad"]["mindspore_cell"] == "backbone.stages.11.expand.conv"
    assert pads["localization"]["first_bad"]["mindspore_cell"] == "backbone.stages.0.conv"
    assert len(pads["localization"]["pad_mismatches"]) == 5  # the stem and the four stride-2 depthwise convs
