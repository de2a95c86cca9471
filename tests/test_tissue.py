"""Tissue detection on synthetic slides with known tissue areas and on the real test slides."""

from __future__ import annotations

import json
import math
import tracemalloc
import warnings

import numpy as np
import pytest

from xtpath.errors import InvalidParameterError
from xtpath.io import open_slide
from xtpath.io.tiffwriter import write_pyramid_tiff
from xtpath.tissue import PRESETS, TissueMask, TissueParams, detect_tissue, save_tissue_outputs, tissue_params

from .conftest import DATA

MPP = 0.5  # µm per level-0 pixel of the synthetic slides


def _he_texture(rng, shape):
    """Pink/purple H&E-like colours with cell-sized noise."""
    base = np.array([200, 110, 170], np.float32)
    noise = rng.normal(0, 18, shape[:2])[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    """6000 x 5000 px at 0.5 µm/px: a disk (r = 1000 µm) with a 300-µm square hole and a 60-µm hole, an 800-µm
    square, and a 100-µm speck (too small for the default preset, kept by 'biopsy'). Expected tissue: disk - big hole + square = pi + 0.64 - 0.09 mm²."""
    rng = np.random.default_rng(0)
    h, w = 5000, 6000
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = (xx - 2000) ** 2 + (yy - 2500) ** 2 <= (1000 / MPP) ** 2
    tissue[2400:3000, 1700:2300] = False  # 300 µm hole: kept
    tissue[2000:2120, 2600:2720] = False  # 60 µm hole: filled
    tissue[1000:2600, 4300:5900] = True  # 800 µm square
    tissue[4400:4600, 5400:5600] = True  # 100 µm speck: removed by default
    img[tissue] = _he_texture(rng, (int(tissue.sum()), 1))[:, 0]
    path = tmp_path_factory.mktemp("tissue") / "he.tif"
    write_pyramid_tiff(path, img, MPP, compression="jpeg")
    return path, math.pi + 0.64 - 0.09


def test_he_area_holes_and_specks(he_slide):
    path, expected = he_slide
    tm = detect_tissue(open_slide(path))
    assert tm.mode == "he"
    assert tm.area_mm2 == pytest.approx(expected, rel=0.03)
    # the big hole stays a hole, the small hole is filled, the speck is gone
    dx = tm.downsample[0]
    assert not tm.mask[int(2700 / dx), int(2000 / dx)]
    assert tm.mask[int(2060 / dx), int(2660 / dx)]
    assert not tm.mask[int(4500 / dx), int(5500 / dx)]
    assert tm.mpp == pytest.approx((8.0, 8.0))


def test_detect_tissue_takes_a_path_as_well_as_a_slide(he_slide):
    path, _ = he_slide
    with open_slide(path) as s:
        from_slide = detect_tissue(s)
    from_path = detect_tissue(str(path))
    assert np.array_equal(from_path.mask, from_slide.mask) and from_path.mask.any()
    with pytest.raises(InvalidParameterError, match="slide=42 is neither a Slide nor a path"):
        detect_tissue(42)


def test_biopsy_preset_keeps_small_fragments(he_slide):
    path, _ = he_slide
    default = detect_tissue(open_slide(path))
    biopsy = detect_tissue(open_slide(path), preset="biopsy")
    dx = biopsy.downsample[0]
    speck = (int(4500 / dx), int(5500 / dx))
    assert not default.mask[speck] and biopsy.mask[speck]
    assert biopsy.area_mm2 > default.area_mm2


def test_mask_read_never_touches_level_zero(he_slide):
    """The mask is read from a coarse level: numpy allocations stay far below one level-0 image (90 MB)."""
    path, _ = he_slide
    s = open_slide(path, backend="tiffslide")
    tracemalloc.start()
    detect_tissue(s)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 30e6  # measured 12.5 MB; level 0 alone is 90 MB


def test_fluorescence_auto_mode(tmp_path):
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(8, 3, (3000, 3000, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:3000, 0:3000]
    blob = (xx - 1500) ** 2 + (yy - 1500) ** 2 <= 800 ** 2
    img[blob] = np.clip(rng.normal(120, 25, (int(blob.sum()), 3)), 0, 255).astype(np.uint8) * np.array([1, 0, 0],
                                                                                                        np.uint8)
    path = tmp_path / "fluo.tif"
    write_pyramid_tiff(path, img, MPP, compression="zlib")
    tm = detect_tissue(open_slide(path))
    assert tm.mode == "fluorescence"
    assert tm.area_mm2 == pytest.approx(math.pi * 0.4 ** 2, rel=0.04)
    forced = detect_tissue(open_slide(path), TissueParams(mode="he"))
    assert forced.mode == "he"


def test_empty_slide_gives_empty_mask_and_warning(tmp_path):
    path = tmp_path / "blank.tif"
    write_pyramid_tiff(path, np.full((1200, 1500, 3), 243, np.uint8), MPP, compression="jpeg")
    with pytest.warns(UserWarning, match="no tissue"):
        tm = detect_tissue(open_slide(path))
    assert tm.empty and tm.area_mm2 == 0.0
    paths = save_tissue_outputs(tm, tmp_path / "out", "blank")
    assert json.loads(paths["geojson"].read_text())["features"] == []
    assert paths["qc"].exists() and paths["mask"].exists()


def test_geojson_outline_matches_mask(he_slide, tmp_path):
    from PIL import Image
    from shapely.geometry import shape

    path, _ = he_slide
    s = open_slide(path)
    tm = detect_tissue(s)
    paths = save_tissue_outputs(tm, tmp_path, s.name)
    assert {p.name for p in paths.values()} == {"he_tissue.png", "he_qc.png", "he_tissue.geojson"}
    fc = json.loads(paths["geojson"].read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2  # disk (with hole) and square
    area_px = 0.0
    for f in fc["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        geom = shape(f["geometry"])
        assert geom.is_valid
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
        x0, y0, x1, y1 = geom.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= 6000 and y1 <= 5000
        area_px += geom.area
    disk = max((shape(f["geometry"]) for f in fc["features"]), key=lambda g: g.area)
    assert len(disk.interiors) == 1  # the 300-µm hole
    assert area_px * MPP * MPP / 1e6 == pytest.approx(tm.area_mm2, rel=0.03)
    mask_png = np.asarray(Image.open(paths["mask"]))
    assert mask_png.shape == tm.mask.shape and set(np.unique(mask_png)) <= {0, 255}
    assert (mask_png > 0).sum() == tm.mask.sum()


def test_fraction_is_exact_on_a_hand_made_mask():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True  # mask pixels of 10 x 10 level-0 px
    tm = TissueMask(mask=mask, downsample=(10.0, 10.0), mpp=(5.0, 5.0), slide_dimensions=(40, 40), mode="he",
                    threshold=0.1, params=TissueParams())
    boxes = np.array([[10, 10, 20, 20],  # exactly the block
                      [0, 0, 20, 20],  # a quarter of it
                      [15, 15, 10, 10],  # inside
                      [5, 10, 10, 20],  # half in x
                      [30, 30, 20, 20],  # outside, partly beyond the slide
                      ], float)
    assert tm.fraction(boxes) == pytest.approx([1.0, 0.25, 1.0, 0.5, 0.0])
    assert tm.fraction(boxes[0]) == pytest.approx([1.0])  # one box as a flat (4,) row
    assert tm.area_mm2 == pytest.approx(4 * 25 / 1e6)
    # region corners alone (N, 2) are not boxes: the library's own error, naming what it needs
    with pytest.raises(InvalidParameterError, match=r"^TissueMask.fraction: boxes must be \(N, 4\) rows of level-0 "
                                                    r"\(x, y, w, h\), got shape \(5, 2\)"):
        tm.fraction(boxes[:, :2])


def test_params_validation():
    assert tissue_params("biopsy") == PRESETS["biopsy"]
    assert tissue_params("default", mask_mpp=4.0).mask_mpp == 4.0
    with pytest.raises(InvalidParameterError, match="biopsy"):
        tissue_params("nonsense")
    with pytest.raises(InvalidParameterError, match="min_area_um2"):
        tissue_params("default", min_area=3)


@pytest.mark.parametrize("name,mpp,mode,lo,hi", [
    ("CMU-1-Small-Region.svs", None, "he", 0.45, 0.65),
    ("tcga-cr-7395-01a-01-ts1.svs", 0.5, "he", 2.2, 2.8),
    ("test3-TRITC-2-560.ndpi", None, "fluorescence", 0.35, 0.6),
    ("OS-2-ndpi.ome.tif", None, "he", 0.12, 0.24),
])
def test_real_slides(name, mpp, mode, lo, hi):
    """Areas found on the real slides (measured when written; a wide band catches a broken detector)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tm = detect_tissue(open_slide(DATA / name, mpp=mpp))
    assert tm.mode == mode
    assert lo < tm.area_mm2 < hi


def test_tissue_outline_stays_inside_the_slide():
    slide = open_slide(DATA / "CMU-1-Small-Region.svs")
    tm = detect_tissue(slide)
    xy = np.array([p for poly in tm.polygons() for ring in poly for p in ring])
    W, H = slide.dimensions
    # tissue reaches the bottom edge of this slide, and the mask's last row reaches past it
    assert xy[:, 1].max() == pytest.approx(H) and xy.min() >= 0 and xy[:, 0].max() <= W


def test_distance_transform_closing_equals_the_disk_structuring_element():
    """The closing that joins tissue runs in time independent of its radius (fine masks have wide radii) and
    gives exactly scipy's closing by skimage's disk."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    from xtpath.tissue import _close_disk

    rng = np.random.default_rng(3)
    joined = 0
    for level in (0.45, 0.5, 0.55):
        m = ndi.gaussian_filter(rng.random((160, 120)), 3) > level
        for r in (1, 4, 9):
            want = ndi.binary_closing(np.pad(m, r), structure=disk(r))[r:-r, r:-r]
            got = _close_disk(m, r)
            assert got.shape == m.shape and np.array_equal(got, want), (level, r)
            joined += int(got.sum() - m.sum())
    assert joined > 1000  # the closings did join tissue
