"""MobileNetV2 network: structure, TF-SAME padding, BatchNorm folding, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from edge_build import network
from edge_build.errors import EdgeBuildError
from edge_build.msenv import mindspore_module


@pytest.fixture(scope="module")
def ms():
    return mindspore_module()


def _randomize_batchnorm(cell, ms, seed=0):
    rng = np.random.default_rng(seed)
    for param in cell.get_parameters():
        if param.name.endswith(("moving_variance", "gamma")):
            param.set_data(ms.Tensor(rng.uniform(0.5, 1.5, param.shape).astype(np.float32)))
        elif param.name.endswith(("moving_mean", "beta")):
            param.set_data(ms.Tensor(rng.normal(0.0, 0.2, param.shape).astype(np.float32)))


@pytest.fixture(scope="module")
def classifier(ms):
    cell = network.build_classifier(network.build_backbone(), network.build_head(26))
    _randomize_batchnorm(cell, ms)
    cell.set_train(False)
    return cell


def _images(batch, size=224, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


def test_structure_follows_the_paper():
    specs = network.conv_specs()
    assert network.NUM_STAGES == 19
    assert len(network.block_specs()) == 17
    assert len(specs) == 52  # stem + 2 (first block) + 16 * 3 + final 1x1
    assert sum(block.residual for block in network.block_specs()) == 10
    assert [s.stride for s in specs if s.stride == 2 and not s.depthwise] == [2]  # only the stem conv
    assert [s.out_channels for s in specs if s.depthwise and s.stride == 2] == [96, 144, 192, 576]


def test_parameters_names_shapes_and_outputs(ms, classifier):
    backbone = classifier.backbone
    names = [p.name for p in classifier.get_parameters()]
    assert names[0] == "backbone.stages.0.conv.weight"
    assert names[-2:] == ["head.weight", "head.bias"]
    assert all(n.startswith(("backbone.stages.", "head.")) for n in names)
    # MobileNetV2 1.0 without its classifier: 2,223,872 trainable weights (BatchNorm included).
    assert sum(int(np.prod(p.shape)) for p in backbone.trainable_params()) == 2_223_872
    assert len(backbone.stages) == network.NUM_STAGES
    x = ms.Tensor(_images(2))
    assert backbone.feature_map(x).shape == (2, 1280, 7, 7)
    assert backbone(x).shape == (2, 1280)
    assert classifier(x).shape == (2, 26)
    # standalone cells carry the same names as inside the classifier
    assert [p.name for p in network.build_head(3).get_parameters()] == ["head.weight", "head.bias"]
    assert next(network.build_backbone().get_parameters()).name == "backbone.stages.0.conv.weight"


def _tf_same_conv_stride2(x, w, b):
    """NumPy reference: TensorFlow SAME padding for a 3x3 stride-2 conv on an even size."""
    x = np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))  # total pad 1: all of it at the bottom/right
    n, _, h, width = x.shape
    out_h, out_w = (h - 3) // 2 + 1, (width - 3) // 2 + 1
    out = np.zeros((n, w.shape[0], out_h, out_w), np.float64)
    for i in range(3):
        for j in range(3):
            patch = x[:, :, i : i + 2 * out_h : 2, j : j + 2 * out_w : 2]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("padding", network.PADDING_MODES)
def test_stride2_padding_modes_against_numpy(ms, padding):
    backbone = network.build_backbone(padding, batch_norm=False)
    stem = backbone.stages[0]
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (32, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 32).astype(np.float32)
    stem.conv.weight.set_data(ms.Tensor(w))
    stem.conv.bias.set_data(ms.Tensor(b))
    x = _images(1, size=16)
    got = stem(ms.Tensor(x)).asnumpy()
    expected = np.clip(_tf_same_conv_stride2(x.astype(np.float64), w, b), 0, 6)
    assert got.shape == expected.shape == (1, 32, 8, 8)
    error = np.abs(got - expected).max()
    if padding == "tf_same":
        assert error < 1e-4
    else:
        assert error > 0.1  # symmetric padding reads a different window: the modes are not interchangeable


def test_unknown_padding_mode_is_refused():
    with pytest.raises(EdgeBuildError, match="unknown padding mode 'same'"):
        network.build_backbone("same")


def test_fold_batchnorm_is_equivalent(ms, classifier):
    x = ms.Tensor(_images(2))
    before = classifier(x).asnumpy()
    folded = network.fold_batchnorm(classifier)
    after = folded(x).asnumpy()
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    names = [p.name for p in folded.get_parameters()]
    assert not any(".bn." in n for n in names)
    assert "backbone.stages.0.conv.bias" in names
    assert not folded.backbone.batch_norm
    assert np.array_equal(classifier(x).asnumpy(), before)  # the source cell is untouched
    backbone_only = network.fold_batchnorm(classifier.backbone)
    assert np.abs(backbone_only(x).asnumpy() - classifier.backbone(x).asnumpy()).max() < 1e-3


def test_checkpoints_save_and_load_separately_and_together(ms, classifier, tmp_path):
    x = ms.Tensor(_images(1))
    expected = classifier(x).asnumpy()
    path = network.save_checkpoint(classifier, tmp_path / "net.ckpt")
    assert path.is_file()
    network.save_checkpoint(classifier.head, tmp_path / "head.ckpt")

    fresh = network.build_classifier(network.build_backbone(), network.build_head(26))
    network.load_checkpoint(fresh, path)
    fresh.set_train(False)
    assert np.array_equal(fresh(x).asnumpy(), expected)

    # a classifier checkpoint loads into a lone backbone; a head checkpoint into a classifier's head
    parts = network.build_classifier(network.build_backbone(), network.build_head(26))
    network.load_checkpoint(parts.backbone, path)
    network.load_checkpoint(parts.head, tmp_path / "head.ckpt")
    parts.set_train(False)
    assert np.array_equal(parts(x).asnumpy(), expected)


def test_load_checkpoint_errors_name_the_file_and_parameter(ms, classifier, tmp_path):
    path = network.save_checkpoint(classifier, tmp_path / "net.ckpt")
    with pytest.raises(EdgeBuildError, match="checkpoint not found"):
        network.load_checkpoint(network.build_head(26), tmp_path / "missing.ckpt")
    with pytest.raises(EdgeBuildError, match=r"head\.weight has shape \[26, 1280\].*needs \[10, 1280\]"):
        network.load_checkpoint(network.build_head(10), path)
    with pytest.raises(EdgeBuildError, match=r"backbone\.stages\.0\.conv\.bias is missing.*BatchNorm form"):
        network.load_checkpoint(network.build_backbone(batch_norm=False), path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(EdgeBuildError, match="not a readable MindSpore checkpoint"):
        network.load_checkpoint(network.build_head(26), truncated)


def test_freeze_stages_and_partial_forward_keep_parameter_names(ms, classifier):
    backbone = network.build_backbone()
    names = [p.name for p in backbone.get_parameters()]
    network.freeze_stages(backbone, 15)
    assert [p.name for p in backbone.get_parameters()] == names
    trainable = {p.name.split(".")[2] for p in backbone.trainable_params()}
    assert trainable == {"15", "16", "17", "18"}
    x = ms.Tensor(_images(1))
    backbone.set_train(False)
    middle = backbone.forward_stages(x, 0, 15)
    assert middle.shape == (1, 160, 7, 7)
    whole = backbone.feature_map(x).asnumpy()
    assert np.abs(backbone.forward_stages(middle, 15).asnumpy() - whole).max() < 1e-5
    with pytest.raises(EdgeBuildError):
        network.freeze_stages(backbone, 20)


def test_inference_forward_compiles_only_inference_cells(ms, classifier, tmp_path):
    folded = network.fold_batchnorm(classifier)
    x = ms.Tensor(_images(2, size=64))
    eager = folded(x).asnumpy()
    forward = network.InferenceForward(folded, compile_after_images=4, enabled=True)
    assert np.array_equal(forward(x).asnumpy(), eager) and forward.compiled is None  # 2 images: PyNative
    compiled = forward(x).asnumpy()  # 4 images of this shape: compiled from here on
    assert forward.compiled is not None
    assert np.abs(compiled - eager).max() <= 1e-5 * np.abs(eager).max()
    path = network.save_checkpoint(folded, tmp_path / "folded.ckpt")
    with pytest.raises(EdgeBuildError, match="already runs compiled"):
        network.load_checkpoint(folded, path)
    # a trainable (BatchNorm) cell may change between calls: it stays PyNative
    assert not network.InferenceForward(classifier, enabled=True).enabled
