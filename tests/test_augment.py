"""Augmentation: view 0 is the image, views are reproducible from (seed, view, image sha256), draws stay in bounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_build.augment import (
    Augmentation,
    ViewParams,
    augment_view,
    draw_params,
    preprocessed_views,
    render,
    view_rng,
)
from edge_build.errors import EdgeBuildError
from edge_build.hashing import sha256_file
from edge_build.images import load_rgb
from edge_build.preprocessing import Preprocessing

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "garbage_26x100"
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4


def gradient_image(height: int = 96, width: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def test_view_zero_is_the_image_itself():
    rgb = gradient_image()
    assert augment_view(rgb, SHA_A, 0, seed=0, aug=Augmentation()) is rgb


def test_views_are_reproducible_and_independent_of_order():
    rgb, aug = gradient_image(), Augmentation()
    forward = [augment_view(rgb, SHA_A, v, 7, aug) for v in range(1, 5)]
    backward = [augment_view(rgb, SHA_A, v, 7, aug) for v in reversed(range(1, 5))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert np.array_equal(a, b)
    # another image's views, drawn in between, change nothing
    augment_view(rgb, SHA_B, 1, 7, aug)
    assert np.array_equal(augment_view(rgb, SHA_A, 1, 7, aug), forward[0])


def test_seed_view_and_image_each_change_the_draw():
    draws = {
        (sha, view, seed): draw_params(128, 96, view_rng(sha, view, seed), Augmentation())
        for sha in (SHA_A, SHA_B)
        for view in (1, 2)
        for seed in (0, 1)
    }
    assert len(set(draws.values())) == len(draws)


def test_draws_stay_in_bounds_and_cover_the_ranges():
    aug = Augmentation(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5, brightness=0.3)
    params = [draw_params(224, 224, view_rng(SHA_A, v, 0), aug) for v in range(1, 401)]
    areas = []
    for p in params:
        left, top, w, h = p.box
        assert min(left, top) >= 0 and left + w <= 224 and top + h <= 224 and min(w, h) > 0
        assert 0.7 <= p.brightness <= 1.3 and 0.7 <= p.contrast <= 1.3 and 0.7 <= p.saturation <= 1.3
        areas.append(w * h / 224**2)
    assert 0.33 <= min(areas) < 0.45 and max(areas) > 0.9
    flips = sum(p.flip for p in params)
    assert 160 <= flips <= 240  # p = 0.5 over 400 draws: 200 +- 5 sigma


def test_render_crops_flips_and_keeps_colours_when_factors_are_one():
    rgb = gradient_image()
    out = render(rgb, ViewParams(box=(10, 20, 50, 40), flip=True, brightness=1.0, contrast=1.0, saturation=1.0))
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgb[20:60, 10:60][:, ::-1])


def test_colour_jitter_moves_brightness_the_right_way():
    rgb = np.full((32, 32, 3), 100, np.uint8)
    box = (0, 0, 32, 32)
    brighter = render(rgb, ViewParams(box, False, 1.3, 1.0, 1.0))
    darker = render(rgb, ViewParams(box, False, 0.7, 1.0, 1.0))
    assert brighter.mean() == pytest.approx(130, abs=1) and darker.mean() == pytest.approx(70, abs=1)


def test_preprocessed_views_go_through_the_one_preprocessing():
    pre = Preprocessing()
    rgb = gradient_image()
    views = preprocessed_views(rgb, SHA_A, 3, 0, Augmentation(), pre)
    assert views.shape == (3, 3, 224, 224) and views.dtype == np.float32
    assert np.array_equal(views[0], pre.apply(rgb))
    assert views.min() >= -1.0 and views.max() <= 1.0
    assert not np.array_equal(views[1], views[0]) and not np.array_equal(views[1], views[2])


def test_real_photo_views_differ_but_stay_close_in_colour():
    path = DATA / "train" / "00_00" / "00001.jpg"
    rgb, sha = load_rgb(path), sha256_file(path)
    views = [augment_view(rgb, sha, v, 0, Augmentation()) for v in range(4)]
    assert all(v.ndim == 3 and v.shape[2] == 3 for v in views)
    assert len({v.tobytes() for v in views}) == 4
    for view in views[1:]:
        assert abs(float(view.mean()) - float(rgb.mean())) < 80


@pytest.mark.parametrize(
    "bad",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.8, 0.5)},
        {"ratio": (2.0, 1.0)},
        {"flip": 1.5},
        {"brightness": 1.0},
    ],
)
def test_invalid_augmentation_is_refused(bad):
    with pytest.raises(EdgeBuildError):
        Augmentation(**bad).validate()
