"""Pyramidal TIFF writing: label masks keep their classes at every level."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import tiffslide

from xtpath.io.tiffwriter import (
    downsample2,
    downsample_labels2,
    label_names_metadata,
    read_label_names,
    write_pyramid_tiff,
)


def test_label_levels_hold_only_values_of_their_four_pixels():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(133, 77))
    half = downsample_labels2(labels)
    assert half.shape == (66, 38)  # the odd edge is dropped, as for RGB levels
    for (r, c), v in np.ndenumerate(half):
        block = labels[2 * r:2 * r + 2, 2 * c:2 * c + 2].ravel()
        counts = {u: int((block == u).sum()) for u in block}
        assert counts[v] == max(counts.values())  # a majority value of the block, never an average
    # background + class 2 in equal parts stays one of them (a box mean would give 1)
    assert downsample_labels2(np.array([[0, 2], [0, 2]], np.uint8))[0, 0] in (0, 2)
    # uint16 labels keep their type and values
    big = np.array([[300, 300], [300, 7]], np.uint16)
    assert downsample_labels2(big).dtype == np.uint16 and downsample_labels2(big)[0, 0] == 300


def test_rgb_levels_average_and_drop_the_odd_edge():
    img = np.zeros((5, 3, 3), np.uint8)
    img[:, :, 0] = 100
    img[:2, :2, 1] = 201  # one 2x2 block, rounded mean
    img[1, 1, 1] = 0
    half = downsample2(img)
    assert half.shape == (2, 1, 3)
    assert (half[..., 0] == 100).all() and half[0, 0, 1] == 151 and half[1, 0, 1] == 0


def test_mask_pyramid_opens_with_its_mpp_and_class_names(tmp_path):
    labels = np.zeros((700, 300), np.uint8)
    labels[:, 150:] = 2
    labels[::3, 149] = 1
    path = write_pyramid_tiff(tmp_path / "mask.ome.tif", labels, (4.0, 4.0), compression="zlib", ome=True,
                              min_size=64, ome_metadata=label_names_metadata({0: "bg", 1: "x", 2: "y"}, "s"))
    ts = tiffslide.TiffSlide(path)
    assert ts.level_dimensions == ((300, 700), (150, 350), (75, 175), (37, 87))  # down to min_size
    assert ts.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
    assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(4.0)
    with tifffile.TiffFile(path) as tf:
        levels = [lv.asarray() for lv in tf.series[0].levels]
    assert np.array_equal(levels[0], labels)
    for lv in levels[1:]:
        assert set(np.unique(lv)) <= {0, 1, 2}
        assert (lv[:, : lv.shape[1] // 2 - 1] == 0).all() and (lv[:, lv.shape[1] // 2 + 1:] == 2).all()
    assert read_label_names(path) == {0: "bg", 1: "x", 2: "y"}
