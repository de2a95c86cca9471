"""HDF5 feature caches: layout, atomic writing, and reading CLAM / TRIDENT files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xtpath.cache import (
    CacheWriter,
    derive_grid,
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
