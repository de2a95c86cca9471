"""Write synthetic slides (xtpath.models.synthetic) as real xtpath HDF5 caches plus a slides CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtpath.cache import SCHEMA_VERSION, CacheWriter
from xtpath.tiling import RegionGrid

from .conftest import DATA

SETTINGS = {"schema_version": SCHEMA_VERSION, "encoder": "synthetic", "weights_sha256": "none",
            "features_kind": "pooled", "encoder_px": 224, "mpp": [0.5, 0.5], "target_mpp": 0.5, "region_px": 224,
            "tissue": {}}


def write_arrangement_dataset(folder: Path, n: int, *, seed: int = 0, rows: int = 10, cols: int = 10,
                              dim: int = 16, split: dict[str, int] | None = None) -> Path:
    """``n`` arrangement-task slides as caches in ``folder/cache`` and ``folder/slides.csv`` (labels touch/apart).

    The CSV's path column points at a real slide file (the caches are what training reads).
    """
    from xtpath.models.synthetic import arrangement_slides

    slides = arrangement_slides(n, rows=rows, cols=cols, dim=dim, seed=seed)
    cache = folder / "cache"
    lines = ["slide_id,path,label,case_id" + (",split" if split else "")]
    names = ["apart", "touch"]
    for i, s in enumerate(slides):
        grid = s.grid.numpy().astype(np.int64)
        regions = RegionGrid(coords=grid[:, ::-1] * 224, grid=grid, tissue=np.ones(len(grid), np.float32),
                             region_size=(224.0, 224.0), region_px=224, encoder_px=224, target_mpp=0.5,
                             slide_mpp=(0.5, 0.5), slide_dimensions=(cols * 224, rows * 224), grid_shape=(rows, cols))
        with CacheWriter(cache / f"s{i:03d}.h5", regions, feature_shape=(dim,), settings=SETTINGS,
                         name=f"s{i:03d}") as w:
            w.write(0, s.features.numpy())
        sp = ""
        if split:
            sp = "," + ("train" if i < split["train"] else "val" if i < split["train"] + split["val"] else "test")
        lines.append(f"s{i:03d},{DATA / 'CMU-1-Small-Region.svs'},{names[s.label]},case{i}{sp}")
    (folder / "slides.csv").write_text("\n".join(lines) + "\n")
    return folder / "slides.csv"
