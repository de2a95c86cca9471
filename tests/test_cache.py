"""HDF5 feature caches: layout, atomic writing, and reading CLAM / TRIDENT files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xtpath.cache import (
    CacheWriter,
    coords_attrs,
    derive_grid,
    lattice_step,
    load_features,
    read_settings,
    settings_differences,
)
from xtpath.errors import CacheError
from xtpath.tiling import make_region_grid

SETTINGS = {"schema_version": 1, "encoder": "enc", "weights_sha256": "abc", "features_kind": "pooled",
            "encoder_px": 224, "mpp": [0.25, 0.25], "target_mpp": 0.5, "region_px": 256,
            "tissue": {"min_tissue": 0.25, "edge": "pad"}}


def _regions():
    return make_region_grid((3000, 2000), 0.25, 0.5, 256)


def test_writer_round_trip(tmp_path):
    g = _regions()
    feats = np.random.default_rng(0).normal(size=(len(g), 8)).astype(np.float32)
    path = tmp_path / "S1.h5"
    with CacheWriter(path, g, feature_shape=(8,), settings=SETTINGS, name="S1") as w:
        for start in range(0, len(g), 7):
            w.write(start, feats[start:start + 7])
    sf = load_features(path)
    assert sf.source == "xtpath" and len(sf) == len(g)
    assert np.array_equal(sf.features, feats)
    assert np.array_equal(sf.coords, g.coords) and np.array_equal(sf.grid, g.grid)
    assert sf.attrs["patch_size"] == 256 and sf.attrs["patch_size_level0"] == 512
    assert sf.attrs["level0_width"] == 3000 and sf.attrs["target_magnification"] == 20.0
    stored = read_settings(path)
    assert settings_differences(stored, SETTINGS) == []
    assert stored["xtpath_version"] and stored["schema_version"] == 1
    with h5py.File(path) as f:  # what a TRIDENT/CLAM loader reads
        assert f["coords"].dtype == np.int64 and f["features"].shape == (len(g), 8)


def test_failed_or_incomplete_write_leaves_nothing(tmp_path):
    g = _regions()
    path = tmp_path / "S1.h5"
    with pytest.raises(ZeroDivisionError):
        with CacheWriter(path, g, feature_shape=(4,), settings=SETTINGS, name="S1") as w:
            w.write(0, np.zeros((3, 4)))
            1 / 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CacheError, match="regions were not written"):
        with CacheWriter(path, g, feature_shape=(4,), settings=SETTINGS, name="S1") as w:
            w.write(0, np.zeros((3, 4)))
    assert list(tmp_path.iterdir()) == []


def test_settings_differences_names_fields():
    other = {**SETTINGS, "encoder": "uni", "target_mpp": 1.0, "mpp": [0.25, 0.2500000001]}
    diffs = settings_differences(SETTINGS, other)
    assert diffs == ["encoder: 'enc' -> 'uni'", "target_mpp: 0.5 -> 1.0"]
    # the tissue settings are a group: only the members that differ are named
    other = {**SETTINGS, "tissue": {"min_tissue": 0.1, "edge": "pad"}}
    assert settings_differences(SETTINGS, other) == ["tissue.min_tissue: 0.25 -> 0.1"]


def test_trident_file(tmp_path):
    """A TRIDENT feature file: coords with patch_size_level0, features (N, D), no grid."""
    rng = np.random.default_rng(1)
    grid = np.array([[0, 0], [0, 1], [2, 3], [1, 1]])
    coords = grid[:, ::-1] * 448 + np.array([100, 60])
    feats = rng.normal(size=(4, 16)).astype(np.float32)
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "t"})
        f.create_dataset("features", data=feats)
    sf = load_features(path)
    assert sf.source == "trident" and np.array_equal(sf.grid, grid) and np.array_equal(sf.features, feats)
    assert sf.region_size_level0 == 448.0 and sf.settings == {}


def test_clam_files(tmp_path):
    """CLAM: coords attrs patch_level/patch_size/downsample, or (feature files) no attrs at all."""
    grid = np.array([[0, 0], [0, 2], [3, 1], [5, 5], [0, 1]])
    coords = grid[:, ::-1] * 512
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_level": 1, "patch_size": 256, "downsample": [2.0, 2.0]})
        f.create_dataset("features", data=np.ones((5, 1024), np.float32))
    sf = load_features(path)
    assert sf.source == "clam" and np.array_equal(sf.grid, grid)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("coords", data=coords + 7)
        f.create_dataset("features", data=np.ones((5, 1024), np.float32))
    assert np.array_equal(load_features(bare).grid, grid)


def test_derive_grid_handles_holes():
    grid = np.array([[0, 0], [0, 1], [0, 2], [4, 9], [2, 2]])
    assert np.array_equal(derive_grid(grid[:, ::-1] * 300.0 + 5), grid)


def _clam_feature_file(path, coords, feats=None):
    """What CLAM's extract_features_fp.py writes: int32 coords without attributes, float32 features."""
    feats = np.arange(len(coords) * 4, dtype=np.float32).reshape(-1, 4) if feats is None else feats
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int32))
        f.create_dataset("features", data=feats)
    return feats


def _piece(x0, y0, rows, cols, step=256):
    """One tissue piece's patches as CLAM cuts them: a lattice starting at the piece's bounding box."""
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([x0 + cc.ravel() * step, y0 + rr.ravel() * step], axis=1)


def test_clam_pieces_on_their_own_lattices_keep_neighbours_adjacent(tmp_path):
    # two tissue pieces 111 px apart in x and 120 px off in y: the smallest gap (111) is not the region size
    a, b = _piece(1000, 500, 3, 3), _piece(1000 + 3 * 256 + 111, 620, 2, 2)
    coords = np.concatenate([a, b])
    assert lattice_step(coords) == 256.0
    feats = _clam_feature_file(tmp_path / "c.h5", coords)
    sf = load_features(tmp_path / "c.h5")
    assert sf.source == "clam" and sf.region_size_level0 == 256.0
    assert np.array_equal(sf.features, feats)
    assert len(np.unique(sf.grid, axis=0)) == 13  # every region its own cell
    # inside each piece, neighbours are grid neighbours; cells are on the slide's grid (nearest to x / 256)
    assert np.array_equal(sf.grid[:9], _piece(0, 0, 3, 3, 1)[:, ::-1] + [2, 4])
    assert np.array_equal(sf.grid[9:], _piece(0, 0, 2, 2, 1)[:, ::-1] + [2, 7])
    # a piece cut half a region off the slide's lattice (x = 128 + 256 k) gets one cell per region, not two
    half = _piece(128, 0, 1, 6)
    assert len(np.unique(derive_grid(half, 256.0), axis=0)) == 6


def test_clam_pieces_closer_than_half_a_region_keep_one_region_per_cell(tmp_path):
    coords = np.concatenate([_piece(0, 0, 2, 2), _piece(300, 40, 1, 2)])  # (300, 40) lands on cell (0, 1)
    feats = _clam_feature_file(tmp_path / "c.h5", coords)
    with pytest.warns(UserWarning, match=r"c\.h5: 1 of 6 regions fall on a grid cell already taken"):
        sf = load_features(tmp_path / "c.h5")
    assert len(sf) == 5 and len(np.unique(sf.grid, axis=0)) == 5
    assert np.array_equal(sf.coords, coords[[0, 1, 2, 3, 5]]) and np.array_equal(sf.features, feats[[0, 1, 2, 3, 5]])


def test_overlapping_foreign_regions_are_refused(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:  # TRIDENT --overlap 64: 224-px patches at 20x, 448 px at level 0
        d = f.create_dataset("coords", data=_piece(0, 0, 3, 3, 448 - 128))
        d.attrs.update({"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 64})
        f.create_dataset("features", data=np.zeros((9, 4), np.float32))
    with pytest.raises(CacheError, match=r"t\.h5: its regions overlap \(overlap=64\); .*\(TRIDENT --overlap 0"):
        load_features(path)
    with h5py.File(path, "w") as f:  # CLAM with step_size 128 < patch_size 256
        d = f.create_dataset("coords", data=_piece(0, 0, 3, 3, 128))
        d.attrs.update({"patch_level": 0, "patch_size": 256, "downsample": [1.0, 1.0]})
        f.create_dataset("features", data=np.zeros((9, 4), np.float32))
    with pytest.raises(CacheError, match=r"neighbours 128 px apart, 256 px wide\).*CLAM step_size = patch_size"):
        load_features(path)


def test_trident_reads_back_the_regions_xtpath_encoded():
    # TRIDENT reads patch_size x level0_magnification / target_magnification level-0 pixels per region
    for mpp, power in ((0.2527, 40.0), (0.2265, 40.0), (0.25, 20.0)):
        g = make_region_grid((3000, 2000), mpp, 0.5, 256)
        a = coords_attrs(g, "s", objective_power=power)
        trident_px = a["patch_size"] * a["level0_magnification"] / a["target_magnification"]
        assert trident_px == pytest.approx(g.region_size[0], rel=1e-9) and abs(a["patch_size_level0"] - trident_px) < 1
        assert a["objective_power"] == power  # the slide's nominal power, kept apart
    assert "objective_power" not in coords_attrs(make_region_grid((3000, 2000), 0.25, 0.5, 256), "s")


def test_bad_files(tmp_path):
    with pytest.raises(CacheError, match="run `xtpath extract` first"):
        load_features(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        load_features(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("feats", data=np.zeros(3))
    with pytest.raises(CacheError, match="needs datasets 'coords' and 'features'"):
        load_features(tmp_path / "x.h5")
