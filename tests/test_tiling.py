"""Nested tokenization geometry: property tests over random slides, masks and sizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xtpath.errors import InvalidParameterError
from xtpath.tiling import hilbert_index, make_region_grid, subregion_boxes
from xtpath.tissue import TissueMask, TissueParams


def _mask(mask: np.ndarray, slide_wh, mask_ds) -> TissueMask:
    return TissueMask(mask=mask, downsample=(mask_ds, mask_ds), mpp=(mask_ds, mask_ds), slide_dimensions=slide_wh,
                      mode="he", threshold=0.5, params=TissueParams())


@st.composite
def slides(draw):
    W = draw(st.integers(20, 6000))
    H = draw(st.integers(20, 6000))
    slide_mpp = draw(st.floats(0.1, 2.0))
    target_mpp = draw(st.floats(0.1, 4.0))
    region_px = draw(st.integers(4, 512))
    # keep regions at least 2 level-0 px wide and the grid small enough to test quickly
    size = region_px * target_mpp / slide_mpp
    if size < 2 or (W / size) * (H / size) > 20000:
        region_px = int(np.ceil(max(2 * slide_mpp / target_mpp, np.sqrt(W * H / 20000) * slide_mpp / target_mpp)))
    mask_ds = draw(st.floats(4.0, 64.0))
    mh, mw = int(np.ceil(H / mask_ds)), int(np.ceil(W / mask_ds))
    seed = draw(st.integers(0, 2**31))
    density = draw(st.floats(0.0, 1.0))
    mask = np.random.default_rng(seed).random((mh, mw)) < density
    return (W, H), slide_mpp, target_mpp, region_px, _mask(mask, (W, H), mask_ds)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slides(), st.sampled_from(["pad", "drop"]), st.sampled_from(["raster", "hilbert"]),
       st.sampled_from([0.0, 0.1, 0.5]))
def test_region_grid_properties(slide, edge, order, min_tissue):
    (W, H), smpp, tmpp, region_px, tm = slide
    g = make_region_grid((W, H), smpp, tmpp, region_px, tissue=tm, min_tissue=min_tissue, edge=edge, order=order)
    sx, sy = g.region_size
    assert sx == pytest.approx(region_px * tmpp / smpp)
    n = len(g)
    assert g.coords.shape == (n, 2) and g.grid.shape == (n, 2) and g.tissue.shape == (n,)
    assert g.coords.dtype == np.int64 and g.grid.dtype == np.int64
    # never overlap: each grid cell at most once, and positions are exactly cell * size
    assert len({(int(r), int(c)) for r, c in g.grid}) == n
    assert np.allclose(g.locations(), g.grid[:, ::-1] * np.array([sx, sy]))
    # grid <-> coordinates round trip
    assert np.array_equal(np.rint(g.locations()).astype(np.int64), g.coords)
    assert np.array_equal(np.rint(g.coords / np.array([sx, sy]))[:, ::-1].astype(np.int64), g.grid)
    # inside the slide (drop) or starting inside it (pad)
    loc = g.locations()
    if edge == "drop":
        assert (loc[:, 0] + sx <= W + 1e-6).all() and (loc[:, 1] + sy <= H + 1e-6).all()
    else:
        assert (loc[:, 0] < W).all() and (loc[:, 1] < H).all()
        rows, cols = g.grid_shape
        assert cols * sx >= W - 1e-6 and rows * sy >= H - 1e-6  # the padded grid covers the slide
    # kept regions hold enough tissue
    if n:
        assert (g.tissue >= min_tissue - 1e-6).all() and (g.tissue > 0).all()
    # with any-tissue regions kept on a padded grid, the regions cover all the tissue
    if edge == "pad" and min_tissue == 0.0:
        total = tm.fraction(np.array([[0, 0, W, H]], float))[0] * W * H
        covered = float((g.tissue.astype(np.float64) * sx * sy).sum())
        assert covered == pytest.approx(total, rel=1e-4, abs=1e-3 * sx * sy)
    # the order option permutes the same set of regions
    if order == "raster" and n:
        key = g.grid[:, 0] * (g.grid[:, 1].max() + 1) + g.grid[:, 1]
        assert (np.diff(key) > 0).all()


def test_raster_and_hilbert_keep_the_same_regions():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 8:45] = True
    tm = _mask(mask, (1000, 800), 20.0)
    a = make_region_grid((1000, 800), 0.5, 1.0, 32, tissue=tm, order="raster")
    b = make_region_grid((1000, 800), 0.5, 1.0, 32, tissue=tm, order="hilbert")
    assert len(a) == len(b) > 0
    assert sorted(map(tuple, a.grid)) == sorted(map(tuple, b.grid))
    assert not np.array_equal(a.grid, b.grid)
    # along the Hilbert order consecutive regions are mostly grid neighbours
    steps = np.abs(np.diff(b.grid, axis=0)).sum(axis=1)
    assert np.mean(steps == 1) > 0.8


def test_hilbert_curve_is_a_path_of_neighbours():
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    d = hilbert_index(r.ravel(), c.ravel())
    assert sorted(d.tolist()) == list(range(256))
    o = np.argsort(d)
    assert (np.abs(np.diff(r.ravel()[o])) + np.abs(np.diff(c.ravel()[o])) == 1).all()


def test_subregions_tile_each_region():
    g = make_region_grid((3000, 2000), 0.25, 0.5, 512, encoder_px=256)
    assert g.subregions_per_side == 2 and g.read_mpp == pytest.approx(0.5) and g.read_px == 512
    sub = subregion_boxes(g)
    assert sub.shape == (len(g), 4, 4)
    box = g.boxes()[5]
    s = sub[5]
    assert s[:, 2:] == pytest.approx(np.tile(box[2:] / 2, (4, 1)))
    assert s[0, :2] == pytest.approx(box[:2])
    assert s[3, :2] + s[3, 2:] == pytest.approx(box[:2] + box[2:])
    # a 256-px region for a 224-px encoder is one input read at 256/224 times the target mpp
    g2 = make_region_grid((3000, 2000), 0.25, 0.5, 256, encoder_px=224)
    assert g2.subregions_per_side == 1 and g2.read_mpp == pytest.approx(0.5 * 256 / 224)


def test_edges_and_shapes():
    # a non-square slide, 1000 x 300 level-0 px, 100-px regions: 10 x 3 cells; pad adds nothing, 1050 adds a column
    assert make_region_grid((1000, 300), 1.0, 1.0, 100).grid_shape == (3, 10)
    assert make_region_grid((1050, 300), 1.0, 1.0, 100, edge="pad").grid_shape == (3, 11)
    assert make_region_grid((1050, 300), 1.0, 1.0, 100, edge="drop").grid_shape == (3, 10)
    assert len(make_region_grid((50, 50), 1.0, 1.0, 100, edge="drop")) == 0
    assert len(make_region_grid((50, 50), 1.0, 1.0, 100, edge="pad")) == 1


@pytest.mark.parametrize("kwargs,name", [
    ({"target_mpp": 0}, "target_mpp"), ({"region_px": -3}, "region_px"), ({"edge": "wrap"}, "edge"),
    ({"order": "zigzag"}, "order"), ({"min_tissue": 2.0}, "min_tissue"), ({"encoder_px": 0}, "encoder_px"),
    ({"slide_mpp": None}, "slide_mpp is None: the slide records no microns per pixel"),
])
def test_bad_parameters_are_named(kwargs, name):
    args = {"slide_dimensions": (100, 100), "slide_mpp": 0.5, "target_mpp": 0.5, "region_px": 10}
    args.update(kwargs)
    with pytest.raises(InvalidParameterError, match=name):
        make_region_grid(**args)


def test_check_resolution_catches_a_wrong_mpp():
    from xtpath.tiling import check_resolution

    check_resolution("s.svs", (0.25, 0.25), 0.5, 256, (20000, 15000))  # an ordinary slide
    with pytest.raises(InvalidParameterError, match=r"s.svs: level 0 is 4 µm/px, 8x coarser than --target-mpp"):
        check_resolution("s.svs", (4.0, 4.0), 0.5, 256, (20000, 15000))
    # mpp given in millimetres: 20000 px x 0.00025 µm = 5 µm, less than one 128 µm region
    with pytest.raises(InvalidParameterError, match=r"s.svs: the whole slide is 5 x 3.75 µm .* smaller than one "
                                                    r"region \(128 µm\)"):
        check_resolution("s.svs", (0.00025, 0.00025), 0.5, 256, (20000, 15000))
    with pytest.raises(InvalidParameterError, match="target_mpp=0 must be a positive number"):
        check_resolution("s.svs", (0.25, 0.25), 0, 256)
