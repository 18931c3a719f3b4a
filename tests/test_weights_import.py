"""TFLite -> MindSpore weights import, verified on the shared sample photos and against LiteRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_build import network, stages
from edge_build.cli import main
from edge_build.errors import EdgeBuildError
from edge_build.images import load_rgb
from edge_build.msenv import mindspore_module
from edge_build.tflite_reader import TensorInfo, WeightLayer, read_tflite
from edge_build.weights import PREPROCESSING, _padding_of, import_weights, load_imported

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
TF1 = WEIGHTS / "mobilenet_v2_1.0_224_quant.tflite"
TF2 = WEIGHTS / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
#: SOURCE.md: top-1 of the reference TFLite runtime for both models, whole photo resized to 224x224.
PHOTOS = {
    "parrot.jpg": "macaw",
    "cat.bmp": "Egyptian cat",
    "hot_dog.jpg": "hotdog",
    "owl.jpg": "ruffed grouse",
    "grace_hopper.bmp": "military uniform",
}

pytestmark = pytest.mark.skipif(not TF1.is_file(), reason="shared weights not present")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def tf1(build_dir):
    return import_weights(TF1, build_dir)


@pytest.fixture(scope="module")
def labels():
    return (WEIGHTS / "imagenet_labels.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def photos():
    """The five photos resized to 224x224 RGB uint8 (what both runtimes see)."""
    return np.stack([PREPROCESSING.resize_rgb(load_rgb(WEIGHTS / name)) for name in PHOTOS])


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _probabilities(classifier, imported, photos):
    ms = mindspore_module()
    return _softmax(classifier(ms.Tensor(imported.preprocessing.normalize(photos))).asnumpy())


def _label(labels, imported, index):
    # imagenet_labels.txt has 'background' on line 0; ImageNet class 0 is line 1. First name only.
    return labels[index - imported.label_offset + 1].split(",")[0]


def _tflite_probabilities(path, photos):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and tuple(inp["shape"]) == (1, 224, 224, 3)
    scale, zero = out["quantization"]
    result = []
    for image in photos:
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        result.append((interpreter.get_tensor(out["index"]).astype(np.float32) - zero) * scale)
    return np.concatenate(result)


def _cosine(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_reader_dequantizes_uint8_per_tensor_and_int8_per_channel():
    for path, dtype, per_channel in ((TF1, "uint8", False), (TF2, "int8", True)):
        graph = read_tflite(path)
        assert len(graph.layers) == 53 and graph.count("ADD") == 10
        stem = graph.layers[0]
        assert stem.op == "CONV_2D" and stem.weight.shape == (32, 3, 3, 3) and stem.stride == 2
        assert stem.quantization["dtype"] == dtype and stem.quantization["per_channel"] is per_channel
        q = stem.weight_tensor.quantization
        scale = q.scale.reshape(-1, 1, 1, 1) if per_channel else q.scale[0]
        zero = q.zero_point.reshape(-1, 1, 1, 1) if per_channel else q.zero_point[0]
        steps = stem.weight / scale + zero  # back on the integer grid: (q - zero_point) * scale was applied
        assert np.abs(steps - np.round(steps)).max() < 1e-3
        assert np.unique(np.round(steps)).size > 50  # real weights, not a constant
        depthwise = graph.layers[1]
        assert depthwise.op == "DEPTHWISE_CONV_2D" and depthwise.weight.shape == (1, 3, 3, 32)
        assert depthwise.bias.dtype == np.float32 and np.abs(depthwise.bias).max() > 0.1


def test_import_records_what_the_weights_expect(tf1):
    meta = json.loads((tf1.directory / "weights.json").read_text(encoding="utf-8"))
    assert meta == tf1.metadata
    assert tf1.directory.name == tf1.sha256[:16]
    assert meta["source"]["file"] == TF1.name and len(meta["source"]["sha256"]) == 64
    assert meta["format"] == "tflite-tf1-slim" and meta["weight_quantization"] == "uint8 per-tensor"
    assert tf1.padding == "tf_same"
    pre = tf1.preprocessing
    assert (pre.size, pre.channel_order, pre.layout) == (224, "RGB", "NCHW")
    assert pre.scale == pytest.approx(1 / 127.5) and pre.offset == -1.0
    assert meta["input"]["shape"] == [None, 3, 224, 224]
    assert meta["tflite_input"]["dtype"] == "uint8" and meta["tflite_input"]["zero_point"] == 128
    assert (tf1.imagenet_classes, tf1.label_offset) == (1001, 1)
    # BatchNorm mapped exactly: gamma 1, mean 0, 1/sqrt(var + eps) == 1
    backbone = tf1.load_backbone()
    bn = backbone.stages[0].bn
    var = bn.moving_variance.asnumpy()
    assert np.allclose(1 / np.sqrt(var + bn.eps), 1.0, atol=1e-6)
    assert np.array_equal(bn.gamma.asnumpy(), np.ones(32, np.float32)) and not bn.moving_mean.asnumpy().any()


def test_second_import_does_no_work(tf1, build_dir):
    runs = list(stages.EXECUTIONS)
    stamp = tf1.checkpoint.stat().st_mtime_ns
    again = import_weights(TF1, build_dir)
    assert runs == stages.EXECUTIONS
    assert again.checkpoint == tf1.checkpoint and again.checkpoint.stat().st_mtime_ns == stamp
    assert load_imported(tf1.directory).metadata == tf1.metadata


def test_tf1_top1_on_sample_photos(tf1, labels, photos):
    probabilities = _probabilities(tf1.load_imagenet_classifier(), tf1, photos)
    top1 = [_label(labels, tf1, int(i)) for i in probabilities.argmax(axis=1)]
    assert top1 == list(PHOTOS.values())
    assert probabilities.max(axis=1).min() > 0.5  # confident, as the reference runtime is


@pytest.mark.parametrize("source", [TF1, TF2], ids=["tf1", "tf2"])
def test_matches_the_tflite_runtime_and_symmetric_padding_is_worse(source, build_dir, labels, photos):
    imported = import_weights(source, build_dir)
    classifier = imported.load_imagenet_classifier(fold_bn=True)
    ours = _probabilities(classifier, imported, photos)
    reference = _tflite_probabilities(source, photos)
    cosine = _cosine(ours, reference)
    per_photo = dict(zip(PHOTOS, cosine.round(4).tolist(), strict=True))
    print(f"\n{source.name}: cosine MindSpore vs LiteRT per photo {per_photo}")
    assert cosine.mean() >= 0.99
    assert (ours.argmax(axis=1) == reference.argmax(axis=1)).all()
    assert [_label(labels, imported, int(i)) for i in reference.argmax(axis=1)] == list(PHOTOS.values())

    # The same weights with symmetric stride-2 padding: measurably less mass on the right class.
    symmetric = network.build_backbone("symmetric", batch_norm=False)
    for target, param in zip(symmetric.get_parameters(), classifier.backbone.get_parameters(), strict=True):
        target.set_data(param.data.copy())
    wrong = network.build_classifier(symmetric, imported.load_imagenet_head())
    wrong.set_train(False)
    worse = _probabilities(wrong, imported, photos)
    right = reference.argmax(axis=1)
    rows = np.arange(len(right))
    drop = ours[rows, right] - worse[rows, right]
    print(f"p(right class) tf_same {ours[rows, right].round(3)}, symmetric {worse[rows, right].round(3)}")
    assert drop.mean() > 0.05 and drop.max() > 0.2
    assert _cosine(worse, reference).mean() < cosine.mean() - 0.01


def test_explicit_pad_ops_map_to_padding_modes():
    """Keras-style graphs pad with a PAD op and run the conv VALID."""
    spec = network.ConvSpec("stages.2.depthwise", 96, 96, 3, 2, True, True)
    info = TensorInfo(7, "dw", "INT8", (1, 3, 3, 96), None, 0)
    graph = read_tflite(TF1)

    def layer(padding, pad):
        return WeightLayer(4, "DEPTHWISE_CONV_2D", info, np.zeros((1, 3, 3, 96), np.float32), None, 2, padding, pad)

    assert _padding_of(graph, layer("SAME", None), spec) == "tf_same"
    assert _padding_of(graph, layer("VALID", (0, 1, 0, 1)), spec) == "tf_same"
    assert _padding_of(graph, layer("VALID", (1, 1, 1, 1)), spec) == "symmetric"
    with pytest.raises(EdgeBuildError, match=r"op 4 \(DEPTHWISE_CONV_2D\) tensor 'dw' is fed by a PAD op"):
        _padding_of(graph, layer("VALID", (1, 0, 1, 0)), spec)
    with pytest.raises(EdgeBuildError, match="padded twice"):
        _padding_of(graph, layer("SAME", (0, 1, 0, 1)), spec)


def _patched_stem_shape(tmp_path, shape):
    """A copy of the TF1 file whose stem weight tensor declares another shape (same element count)."""
    import tflite

    data = bytearray(TF1.read_bytes())
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    stem_op = graph.Operators(0)
    dims = graph.Tensors(int(stem_op.Inputs(1))).ShapeAsNumpy()  # a writable view into `data`
    dims[:] = shape
    path = tmp_path / "not_mobilenet.tflite"
    path.write_bytes(bytes(data))
    return path


def test_bad_inputs_fail_with_one_line_naming_the_problem(tmp_path):
    not_tflite = tmp_path / "photo.tflite"
    not_tflite.write_bytes((WEIGHTS / "owl.jpg").read_bytes())
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(TF1.read_bytes()[:1_000_000])
    wrong_shape = _patched_stem_shape(tmp_path, [96, 3, 3, 1])
    cases = {
        not_tflite: "photo.tflite: not a TFLite file",
        truncated: "truncated.tflite: truncated or corrupt TFLite file",
        wrong_shape: r"op 0 \(CONV_2D\) tensor 'MobilenetV2/Conv/.*' has shape \[96, 3, 3, 1\], stages.0 needs "
        r"\[32, 3, 3, 3\]; not a MobileNetV2 1.0 224",
        tmp_path / "missing.tflite": "weights file not found",
    }
    for path, message in cases.items():
        with pytest.raises(EdgeBuildError, match=message):
            import_weights(path, tmp_path / "build")
        result = CliRunner().invoke(main, ["weights", "import", str(path), "--build", str(tmp_path / "build")])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not any((tmp_path / "build" / "weights").glob("*"))  # failed imports leave nothing behind


def test_cli_import_writes_checkpoint_and_reports_cache(tmp_path):
    build, out = tmp_path / "build", tmp_path / "backbone.ckpt"
    args = ["weights", "import", str(TF1), "--build", str(build), "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("imported: ") and "padding       tf_same" in first.output
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["padding"] == "tf_same"
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and second.output.startswith("up to date: ")
    backbone = network.build_backbone()
    network.load_checkpoint(backbone, out)
