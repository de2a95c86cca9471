"""Per-slide HDF5 files of region coordinates and features: the only module that knows the dataset names.

Layout (``schema_version`` 1), readable by CLAM and TRIDENT loaders:

========================  =====================  =========================================================
name                      shape / type           meaning
========================  =====================  =========================================================
``coords``                (N, 2) int64           level-0 ``(x, y)`` of each region's top-left corner;
                                                 attributes ``patch_size``, ``patch_size_level0``,
                                                 ``level0_magnification``, ``target_magnification``,
                                                 ``level0_width``, ``level0_height``, ``name`` (TRIDENT)
                                                 and ``patch_level``, ``downsample`` (CLAM);
                                                 ``objective_power`` when the slide records one
``features``              (N, D) or (N, h, w, D) pooled vector or token grid per region
``grid``                  (N, 2) int64           ``(row, col)`` of each region on the region grid
``tissue``                (N,) float32           tissue fraction of each region
file attributes           ``mpp``, ``target_mpp``, ``region_px``, ``encoder``, ``weights_sha256``,
                          ``xtpath_version``, ``schema_version``, ``features_kind``, ``config`` (JSON)
========================  =====================  =========================================================

Feature files made by CLAM or TRIDENT (``coords`` + ``features`` and no ``grid``) are read too: the grid is
derived from the coordinates (:func:`derive_grid`), on the slide's own grid like xtpath's.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.errors import CacheError
from xtpath.io.files import atomic_path, publish
from xtpath.tiling import RegionGrid

__all__ = [
    "COORDS", "GRID", "TISSUE", "FEATURES", "SCHEMA_VERSION", "KEY_FIELDS",
    "write_coords", "coords_attrs", "CacheWriter", "SlideFeatures", "load_features", "read_settings",
    "read_coords_attrs", "feature_dtype",
    "settings_differences", "same_setting", "other_slide", "derive_grid", "lattice_step", "cache_path",
]

COORDS = "coords"
GRID = "grid"
TISSUE = "tissue"
FEATURES = "features"
SCHEMA_VERSION = 1
# the settings that must match for a cached file to be reused
KEY_FIELDS = ("schema_version", "encoder", "weights_sha256", "features_kind", "encoder_px", "mpp", "target_mpp",
              "region_px", "tissue")


def cache_path(cache_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where the features of ``slide_id`` live: ``CACHE_DIR/<slide_id>.h5``."""
    return Path(cache_dir) / f"{slide_id}.h5"


def _magnification(mpp: float) -> float:
    # the usual convention: 40x = 0.25 um/px, 20x = 0.5 um/px
    return 10.0 / mpp


def coords_attrs(regions: RegionGrid, name: str, objective_power: float | None = None) -> dict[str, Any]:
    """The CLAM/TRIDENT attributes of the ``coords`` dataset for a region grid."""
    mx = regions.slide_mpp[0]
    return {
        "patch_size": int(regions.region_px),
        "patch_size_level0": int(round(regions.region_size[0])),
        # TRIDENT re-reads a region as patch_size x level0_magnification / target_magnification level-0 pixels:
        # both from the exact mpp, so that this is patch_size_level0 (the objective's nominal power, which can
        # be 10 % off the mpp or plain wrong, is kept apart as objective_power)
        "level0_magnification": _magnification(mx),
        "target_magnification": _magnification(regions.target_mpp),
        "level0_width": int(regions.slide_dimensions[0]),
        "level0_height": int(regions.slide_dimensions[1]),
        "name": name,
        "overlap": 0,
        # CLAM's names: regions cut from level 0. CLAM's readers read patch_size (TRIDENT's meaning: the side at
        # the target resolution) pixels at patch_level, which is the region only when level 0 is at the target
        # mpp; xtpath's CLAM reader takes patch_size x downsample (= patch_size_level0), see _foreign_step
        "patch_level": 0,
        "downsample": [float(regions.region_size[0] / regions.region_px)] * 2,
        **({"objective_power": float(objective_power)} if objective_power else {}),
    }


def _write_regions(f: Any, regions: RegionGrid, name: str, objective_power: float | None) -> None:
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
    f.attrs["grid_shape"] = list(regions.grid_shape)
    f.attrs["slide_dimensions"] = list(regions.slide_dimensions)


def write_coords(path: str | os.PathLike[str], regions: RegionGrid, *, name: str,
                 objective_power: float | None = None, config: dict[str, Any] | None = None) -> Path:
    """Write a coordinates-only HDF5 file (a CLAM/TRIDENT patch file) atomically and return its path."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_regions(f, regions, name, objective_power)
            if config is not None:
                f.attrs["config"] = json.dumps(config)
    return path


def _attr_value(v: Any) -> Any:
    """HDF5 attribute for a setting: numbers and lists of numbers as they are, anything else as JSON text."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
        return np.asarray(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return v


class CacheWriter:
    """Write one slide's features batch by batch into a temporary file, renamed into place on success.

    A killed process leaves only a ``.<slide_id>.h5.<pid>.tmp`` file, never a partial ``<slide_id>.h5``.

    Examples
    --------
    >>> with CacheWriter(path, regions, feature_shape=(768,), settings=s, name="S1") as w:  # doctest: +SKIP
    ...     for start, batch in batches:
    ...         w.write(start, batch)
    """

    def __init__(self, path: str | os.PathLike[str], regions: RegionGrid, *, feature_shape: tuple[int, ...],
                 settings: dict[str, Any], name: str, dtype: str = "float32",
                 objective_power: float | None = None, extra_attrs: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.regions = regions
        self.feature_shape = tuple(int(v) for v in feature_shape)
        self.settings = settings
        self.name = name
        self.dtype = np.dtype(dtype)
        self.objective_power = objective_power
        self.extra_attrs = extra_attrs or {}
        self._written = np.zeros(len(regions), dtype=bool)
        self._file: Any = None
        self.tmp: Path | None = None

    def __enter__(self) -> "CacheWriter":
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self._file = h5py.File(self.tmp, "w")
        f = self._file
        _write_regions(f, self.regions, self.name, self.objective_power)
        n = len(self.regions)
        chunk = (max(1, min(n, max(1, 2**20 // max(1, int(np.prod(self.feature_shape)) * self.dtype.itemsize)))),
                 *self.feature_shape)
        f.create_dataset(FEATURES, shape=(n, *self.feature_shape), dtype=self.dtype, chunks=chunk if n else None)
        for k, v in self.settings.items():
            f.attrs[k] = _attr_value(v)
        f.attrs["features_kind"] = self.settings.get("features_kind", "pooled")
        from xtpath import __version__

        f.attrs["xtpath_version"] = __version__
        f.attrs["config"] = json.dumps({**self.settings, **self.extra_attrs}, default=str)
        for k, v in self.extra_attrs.items():
            if v is not None:
                f.attrs[k] = _attr_value(v)
        return self

    def write(self, start: int, batch: np.ndarray) -> None:
        """Store features of regions ``start .. start + len(batch)``."""
        batch = np.asarray(batch)
        if batch.shape[1:] != self.feature_shape:
            raise CacheError(f"{self.path}: feature batch of shape {batch.shape[1:]} does not match "
                             f"{self.feature_shape}")
        self._file[FEATURES][start:start + len(batch)] = batch.astype(self.dtype, copy=False)
        self._written[start:start + len(batch)] = True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._file.close()
        assert self.tmp is not None
        if exc_type is None and self._written.all():
            publish(self.tmp, self.path)
            return
        self.tmp.unlink(missing_ok=True)
        if exc_type is None:
            missing = int((~self._written).sum())
            raise CacheError(f"{self.path}: {missing} of {len(self._written)} regions were not written")


@dataclass
class SlideFeatures:
    """Features of one slide, however they were made.

    Attributes
    ----------
    features : np.ndarray
        ``(N, D)`` pooled vectors or ``(N, h, w, D)`` token grids.
    coords : (N, 2) int64
        Level-0 ``(x, y)`` of each region.
    grid : (N, 2) int64
        ``(row, col)`` of each region.
    tissue : (N,) float32 or None
    settings : dict
        xtpath's settings (encoder, weights hash, mpp, ...); empty for foreign files.
    source : str
        ``"xtpath"``, ``"trident"`` or ``"clam"``.
    attrs : dict
        The ``coords`` attributes.
    path : Path or None
        The file read.
    """

    features: np.ndarray
    coords: np.ndarray
    grid: np.ndarray
    tissue: np.ndarray | None
    settings: dict[str, Any]
    source: str
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    region_step: float | None = None
    """CLAM/TRIDENT files: the region side the grid was derived with (from the attributes, else the spacing of
    neighbouring regions)."""

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def region_size_level0(self) -> float | None:
        """Region side in level-0 pixels: xtpath's setting, CLAM's or TRIDENT's attributes, or (CLAM feature
        files, which record none) the spacing of neighbouring regions."""
        v = self.settings.get("region_size_level0")
        if v is not None:
            return float(np.atleast_1d(v)[0])
        size = _foreign_step(self.attrs)
        return size if size is not None else self.region_step


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, str) and v[:1] in "{[":
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(v)
    return v


def _foreign_step(attrs: dict[str, Any]) -> float | None:
    """Region side in level-0 pixels from a CLAM or TRIDENT ``coords`` dataset's attributes: TRIDENT's
    ``patch_size_level0``, or CLAM's ``patch_size`` (at ``patch_level``) times that level's ``downsample``."""
    if attrs.get("patch_size_level0") is not None:
        return float(np.atleast_1d(attrs["patch_size_level0"])[0])
    if attrs.get("patch_size") is not None:
        return float(np.atleast_1d(attrs["patch_size"])[0]) * float(np.atleast_1d(attrs.get("downsample", [1.0]))[0])
    return None


def read_coords_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The attributes of a feature file's ``coords`` dataset (CLAM's and TRIDENT's patch settings), without
    reading the features."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: _attr(v) for k, v in f[COORDS].attrs.items()} if COORDS in f else {}


def feature_dtype(path: str | os.PathLike[str]) -> str:
    """The number type of a cache's stored features (``"float32"``, ``"float16"``)."""
    import h5py

    with h5py.File(path, "r") as f:
        return str(f[FEATURES].dtype)


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """xtpath's settings stored in a cache file, or ``None`` when the file is not an xtpath cache."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "schema_version" not in f.attrs:
                return None
            return {k: _attr(v) for k, v in f.attrs.items()}
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e}); delete it, and the rerun makes it again") from e


def same_setting(a: Any, b: Any) -> bool:
    """Two values of a cache setting are the same (numbers to rounding: an mpp of 1 and 1.0 are one)."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return a is not None and b is not None and bool(np.allclose(np.asarray(a, float), np.asarray(b, float)))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-9 * max(1.0, abs(float(b)))
    return bool(a == b)


def other_slide(stored: dict[str, Any], dimensions: tuple[int, int], fingerprint: str | None = None) -> str | None:
    """Why a cache was made from another slide than this one (level-0 ``dimensions`` ``(w, h)``, and
    :func:`xtpath.io.files.file_fingerprint`), or ``None``: a slide_id reused for another file must not get the
    first file's features. Caches that recorded neither (other tools') pass."""
    made = stored.get("slide_dimensions")
    where = stored.get("slide_path", "unknown path")
    if made is not None and not same_setting(list(made), list(dimensions)):
        return (f"made from a slide of {int(made[0])} x {int(made[1])} px ({where}), not this one of "
                f"{dimensions[0]} x {dimensions[1]} px")
    known = stored.get("slide_fingerprint")
    if known and fingerprint and known != fingerprint:
        return f"made from {where} when it had another size or content (a replaced file, or another one)"
    return None


def settings_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The key settings (:data:`KEY_FIELDS`) that differ, as ``"name: stored -> wanted"`` strings; for settings
    that are groups (the tissue detector's), only the members that differ (``"tissue.min_area_um2: ..."``)."""
    out = []
    for k in KEY_FIELDS:
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{m}: {a.get(m)!r} -> {b.get(m)!r}" for m in sorted(a.keys() | b.keys())
                    if not same_setting(a.get(m), b.get(m))]
        elif not same_setting(a, b):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def lattice_step(coords: np.ndarray) -> float | None:
    """The spacing of neighbouring regions in level-0 pixels: the most common gap between consecutive regions
    of one row (same y) or one column (same x). ``None`` when no two regions share a row or a column.

    Robust to what the smallest gap is not: CLAM cuts each tissue piece on its own lattice (starting at the
    piece's bounding box), so regions of two pieces can be a few pixels apart in x or y.
    """
    c = np.asarray(coords, dtype=np.float64)
    gaps = []
    for a in (0, 1):
        o = 1 - a
        s = c[np.lexsort((c[:, a], c[:, o]))]
        d = np.diff(s[:, a])[s[1:, o] == s[:-1, o]]
        gaps.append(d[d > 0.5])
    every = np.concatenate(gaps)
    if not len(every):
        return None
    values, counts = np.unique(np.round(every, 3), return_counts=True)
    return float(values[np.argmax(counts)])


def derive_grid(coords: np.ndarray, step: float | None = None) -> np.ndarray:
    """``(row, col)`` of square regions from their level-0 ``(x, y)``, on the slide's grid: region ``(r, c)``
    starts nearest to ``(c * step, r * step)``, as xtpath's own regions do.

    ``step`` is the region side in level-0 pixels; without it, :func:`lattice_step` (or, when no two regions
    share a row or column, the smallest gap between distinct x or y values).
    """
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) == 0:
        return np.zeros((0, 2), np.int64)
    if step is None:
        step = lattice_step(coords)
    if step is None:
        gaps = np.concatenate([np.diff(np.unique(coords[:, a])) for a in (0, 1)])
        gaps = gaps[gaps > 0.5]
        step = float(gaps.min()) if len(gaps) else 1.0
    # floor(v + 0.5), not rint: rint rounds halves to even, which would put a piece cut half a region off the
    # slide's lattice onto every other cell twice
    cells = np.floor(coords / step + 0.5).astype(np.int64)
    return cells[:, ::-1].copy()


def _foreign_layout(path: Path, coords: np.ndarray, attrs: dict[str, Any]) -> tuple[np.ndarray, float | None]:
    """Grid and region side (level-0 pixels) of a CLAM or TRIDENT file's regions.

    Raises
    ------
    CacheError
        The regions overlap (TRIDENT's ``--overlap``, CLAM's ``step_size`` below ``patch_size``).
    """
    size = _foreign_step(attrs)
    step = lattice_step(coords)
    overlap = float(np.atleast_1d(attrs.get("overlap", 0) or 0)[0])
    if overlap > 0 or (size is not None and step is not None and step < 0.9 * size):
        how = f"overlap={overlap:g}" if overlap > 0 else f"neighbours {step:g} px apart, {size:g} px wide"
        raise CacheError(f"{path}: its regions overlap ({how}); xtpath's context model needs regions that tile "
                         "the slide: patch again without overlap (TRIDENT --overlap 0, CLAM step_size = "
                         "patch_size) or extract with xtpath")
    return derive_grid(coords, size or step), size or step


def load_features(path: str | os.PathLike[str], *, mmap: bool = False) -> SlideFeatures:
    """Read a feature file written by xtpath, TRIDENT or CLAM.

    Raises
    ------
    CacheError
        Missing file, unreadable HDF5, or no ``coords``/``features`` datasets.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"{path}: no such feature file; run `xtpath extract` first")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e}); delete it and extract again") from e
    with f:
        if COORDS not in f or FEATURES not in f:
            raise CacheError(f"{path}: needs datasets 'coords' and 'features' (found: {', '.join(f.keys())})")
        coords = np.asarray(f[COORDS][:], dtype=np.int64)
        feats = f[FEATURES][:]
        if feats.ndim == 3 and feats.shape[0] == 1 and coords.ndim == 3:  # CLAM/TRIDENT variants with batch dim
            feats, coords = feats[0], coords[0]
        attrs = {k: _attr(v) for k, v in f[COORDS].attrs.items()}
        if "schema_version" in f.attrs:
            settings = {k: _attr(v) for k, v in f.attrs.items()}
            grid = np.asarray(f[GRID][:], dtype=np.int64)
            tissue = np.asarray(f[TISSUE][:], dtype=np.float32) if TISSUE in f else None
            source = "xtpath"
        else:
            settings = {}
            tissue = None
            source = "trident" if "patch_size_level0" in attrs else "clam"
            grid, step = _foreign_layout(path, coords, attrs)
    if len(feats) != len(coords):
        raise CacheError(f"{path}: {len(feats)} feature rows but {len(coords)} coordinates")
    if source != "xtpath":
        _, keep = np.unique(grid, axis=0, return_index=True)
        if len(keep) < len(coords):  # two pieces' lattices within half a region: keep one region per cell
            keep.sort()
            warnings.warn(f"{path}: {len(coords) - len(keep)} of {len(coords)} regions fall on a grid cell "
                          "already taken (tissue pieces patched on their own lattices, as CLAM does, that come "
                          "within half a region of each other); kept the first region of each cell",
                          stacklevel=2)
            grid, feats, coords = grid[keep], feats[keep], coords[keep]
    return SlideFeatures(features=feats, coords=coords, grid=grid, tissue=tissue, settings=settings, source=source,
                         attrs=attrs, path=path, region_step=None if source == "xtpath" else step)
