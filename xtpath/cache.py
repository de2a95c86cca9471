"""HDF5 files of region coordinates and features: the only module that knows the dataset and attribute names.

The layout is readable by CLAM and TRIDENT: dataset ``coords`` (N, 2) int64 level-0 ``(x, y)`` with attributes
``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``level0_width``,
``level0_height``, ``name``. xtpath adds ``grid`` (N, 2) ``(row, col)`` and ``tissue`` (N,) and its own
attributes on the file root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.io.files import atomic_path
from xtpath.tiling import RegionGrid

__all__ = ["COORDS", "GRID", "TISSUE", "FEATURES", "SCHEMA_VERSION", "write_coords", "coords_attrs"]

COORDS = "coords"
GRID = "grid"
TISSUE = "tissue"
FEATURES = "features"
SCHEMA_VERSION = 1


def _magnification(mpp: float) -> float:
    # the usual convention: 40x = 0.25 um/px, 20x = 0.5 um/px
    return 10.0 / mpp


def coords_attrs(regions: RegionGrid, name: str, objective_power: float | None = None) -> dict[str, Any]:
    """The CLAM/TRIDENT attributes of the ``coords`` dataset for a region grid."""
    mx = regions.slide_mpp[0]
    return {
        "patch_size": int(regions.region_px),
        "patch_size_level0": int(round(regions.region_size[0])),
        "level0_magnification": float(objective_power) if objective_power else _magnification(mx),
        "target_magnification": _magnification(regions.target_mpp),
        "level0_width": int(regions.slide_dimensions[0]),
        "level0_height": int(regions.slide_dimensions[1]),
        "name": name,
        # CLAM reads these two: features came from level 0 regions of patch_size_level0 pixels
        "patch_level": 0,
        "downsample": [float(regions.region_size[0] / regions.region_px)] * 2,
    }


def write_coords(path: str | os.PathLike[str], regions: RegionGrid, *, name: str,
                 objective_power: float | None = None, config: dict[str, Any] | None = None) -> Path:
    """Write a coordinates-only HDF5 file (a CLAM/TRIDENT patch file) atomically and return its path."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset(COORDS, data=np.asarray(regions.coords, dtype=np.int64))
            for k, v in coords_attrs(regions, name, objective_power).items():
                d.attrs[k] = v
            f.create_dataset(GRID, data=np.asarray(regions.grid, dtype=np.int64))
            f.create_dataset(TISSUE, data=np.asarray(regions.tissue, dtype=np.float32))
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["target_mpp"] = regions.target_mpp
            f.attrs["mpp"] = list(regions.slide_mpp)
            f.attrs["region_px"] = regions.region_px
            f.attrs["region_size_level0"] = list(regions.region_size)
            if config is not None:
                f.attrs["config"] = json.dumps(config)
    return path
