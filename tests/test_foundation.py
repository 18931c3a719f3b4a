"""Settings, atomic writes, stage caching, taxonomy, image decoding and preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_build import atomic, stages, taxonomy
from edge_build.config import load_settings
from edge_build.errors import EdgeBuildError
from edge_build.images import ImageError, as_rgb_array, load_rgb
from edge_build.preprocessing import Preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def test_taxonomy_order_and_bins():
    assert len(taxonomy.CLASSES) == 26
    assert taxonomy.CLASSES[0].code == "00_00" and taxonomy.CLASSES[25].code == "03_03"
    assert [taxonomy.bin_index(i) for i in (0, 9, 10, 17, 18, 21, 22, 25)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert taxonomy.BY_CODE["02_01"].english == "battery"
    assert taxonomy.BY_CODE["02_01"].bin.chinese == "有害垃圾"


def test_shared_label_file_is_gbk_and_agrees_with_taxonomy():
    label = SHARED / "data/garbage_26x100/label.txt"
    if not label.exists():
        pytest.skip("shared data set not present")
    entries = taxonomy.read_label_file(label)
    assert entries["00_00"] == "塑料瓶"
    assert taxonomy.compare_label_file(label) == []


def test_label_file_disagreement_is_reported(tmp_path):
    label = tmp_path / "label.txt"
    label.write_text("塑料瓶: 00_00\n不存在: 09_09\n", encoding="utf-8")
    problems = taxonomy.compare_label_file(label)
    assert any("09_09" in p for p in problems)
    assert any("does not list class 03_03" in p for p in problems)


def test_settings_precedence_option_env_file(tmp_path, monkeypatch):
    (tmp_path / "edge-build.toml").write_text('[paths]\ndata = "d_from_file"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGE_BUILD_DATA", raising=False)
    monkeypatch.delenv("EDGE_BUILD_CONFIG", raising=False)
    assert load_settings().data.path == tmp_path / "d_from_file"
    monkeypatch.setenv("EDGE_BUILD_DATA", str(tmp_path / "d_env"))
    assert load_settings().data.path == tmp_path / "d_env"
    assert load_settings({"data": str(tmp_path / "d_opt")}).data.path == tmp_path / "d_opt"


def test_missing_path_error_names_setting_and_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGE_BUILD_CONFIG", raising=False)
    monkeypatch.setenv("EDGE_BUILD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EdgeBuildError) as info:
        load_settings().data.require_dir("data set")
    text = str(info.value)
    assert "nowhere" in text and "EDGE_BUILD_DATA" in text and "--data" in text


def test_config_unknown_key_is_named(tmp_path, monkeypatch):
    (tmp_path / "edge-build.toml").write_text('[paths]\ndatta = "x"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGE_BUILD_CONFIG", raising=False)
    with pytest.raises(EdgeBuildError, match=r"paths\.datta"):
        load_settings()


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_reports_disk_errors(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    atomic.write_bytes(target, b"old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(EdgeBuildError, match="No space left"):
        atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


def test_build_lock_keeps_scratch_in_the_build_dir_and_clears_a_killed_builds_leftovers(tmp_path):
    import tempfile

    from edge_build.locking import SCRATCH, build_lock

    build = tmp_path / "build"
    stale = build / SCRATCH / "tmpkilled" / "model.onnx"  # what a `kill -9`ed export left behind
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    outside = tempfile.gettempdir()
    with build_lock(build):
        assert Path(tempfile.gettempdir()) == build / SCRATCH
        assert not stale.exists()
        with tempfile.TemporaryDirectory() as scratch:  # how export, quantize and ONNX Runtime get scratch space
            assert Path(scratch).parent == build / SCRATCH
    assert tempfile.gettempdir() == outside
    assert not (build / SCRATCH).exists()


def test_publish_lock_makes_a_second_publisher_to_the_same_bundle_wait(tmp_path):
    import threading

    from edge_build import bundle

    target = tmp_path / "dist" / "lite"
    order: list[str] = []

    def second(name: str, directory: Path) -> threading.Thread:
        def publish() -> None:
            with bundle.publish_lock(directory):
                order.append(name)

        thread = threading.Thread(target=publish)
        thread.start()
        return thread

    with bundle.publish_lock(target):
        other_target = second("cpu", tmp_path / "dist" / "cpu")
        other_target.join(timeout=10)
        same_target = second("lite, second build", target)
        same_target.join(timeout=1)
        assert same_target.is_alive(), "a second build assembled into the staging directory the first is using"
        order.append("lite, first build")
    same_target.join(timeout=10)
    assert order == ["cpu", "lite, first build", "lite, second build"]
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [".publish-cpu.lock", ".publish-lite.lock"]


def test_stage_runs_once_then_skips_and_reruns_on_change_or_corruption(tmp_path):
    calls = []

    def produce(directory: Path) -> dict:
        calls.append(1)
        atomic.write_text(directory / "out.txt", "result")
        return {"n": len(calls)}

    first = stages.run_stage("demo", tmp_path / "demo", {"x": 1}, produce)
    second = stages.run_stage("demo", tmp_path / "demo", {"x": 1}, produce)
    assert first.ran and not second.ran and second.info == {"n": 1}
    stages.run_stage("demo", tmp_path / "demo", {"x": 2}, produce)
    assert len(calls) == 2
    (tmp_path / "demo/out.txt").write_text("tampered")
    assert stages.run_stage("demo", tmp_path / "demo", {"x": 2}, produce).ran
    assert len(calls) == 3


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    base = Image.new("RGB", (20, 10), (200, 30, 40))
    image = base.convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10), 30000)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    rgb = load_rgb(_save(tmp_path / f"x{suffix}", image))
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.uint8


def test_exif_rotation_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgb = load_rgb(_save(tmp_path / "r.jpg", image, exif=exif))
    assert rgb.shape == (30, 10, 3)


def test_rgb_order_kept(tmp_path):
    rgb = load_rgb(_save(tmp_path / "red.png", Image.new("RGB", (4, 4), (255, 0, 0))))
    assert tuple(rgb[0, 0]) == (255, 0, 0)


def test_bad_images_raise_clear_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = _save(tmp_path / "good.jpg", Image.new("RGB", (64, 64), (1, 2, 3)))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    for name, fragment in [("empty.jpg", "empty"), ("text.jpg", "not an image"), ("cut.jpg", "corrupt or truncated")]:
        with pytest.raises(ImageError, match=fragment) as info:
            load_rgb(tmp_path / name)
        assert name in str(info.value)


def test_array_validation():
    with pytest.raises(ImageError, match="HxWx3"):
        as_rgb_array(np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageError, match="uint8"):
        as_rgb_array(np.zeros((4, 4, 3), np.float32))


def test_preprocessing_scales_to_minus_one_one_nchw():
    pre = Preprocessing()
    x = pre.apply(np.full((300, 200, 3), 255, np.uint8))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.allclose(x, 1.0)
    assert np.allclose(pre.apply(np.zeros((224, 224, 3), np.uint8)), -1.0)
    assert Preprocessing.from_dict(pre.as_dict()) == pre
