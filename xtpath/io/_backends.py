"""Thin adapters over the two slide libraries, openslide and tiffslide.

Each adapter answers the same few questions (level sizes, properties, associated images) and reads one window
of one pyramid level in *level* pixel coordinates. All geometry (which level, resampling, out-of-bounds fill)
lives in :mod:`xtpath.io.slide`, so both libraries are driven the same way.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np

BACKENDS = ("openslide", "tiffslide")


class BackendHandle(Protocol):
    """What :class:`xtpath.io.slide.Slide` needs from an open slide file."""

    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    reported_downsamples: tuple[float, ...]
    properties: dict[str, Any]
    vendor: str | None

    def associated_names(self) -> list[str]: ...

    def read_associated(self, name: str) -> np.ndarray: ...

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, float, float]:
        """Read ``w x h`` pixels of ``level`` starting at integer level pixel ``(x, y)`` (inside the level).

        Returns ``(rgb, x_origin, y_origin)``: an ``(h, w, 3)`` uint8 array and the level-pixel position of its
        top-left pixel, which differs from ``(x, y)`` by a fraction when the library cannot start exactly there.
        """
        ...

    def close(self) -> None: ...


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from RGB, RGBA (composited on white) or grey arrays, shape (h, w, 3)."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


class OpenSlideHandle:
    """openslide-python over the openslide-bin library (SVS, NDPI, DICOM, MRXS, generic tiled TIFF, ...)."""

    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._osr = openslide.OpenSlide(path)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self.reported_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.properties = dict(self._osr.properties)
        self.vendor = self.properties.get("openslide.vendor")

    def associated_names(self) -> list[str]:
        return list(self._osr.associated_images.keys())

    def read_associated(self, name: str) -> np.ndarray:
        return _to_rgb(np.asarray(self._osr.associated_images[name]))

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, float, float]:
        # openslide takes the location in level-0 pixels and divides it by its own (averaged) downsample,
        # rendering sub-pixel offsets by bilinear interpolation. Ask for the level-0 pixel that lands nearest
        # to the wanted level pixel and report where the window really starts.
        ds = self.reported_downsamples[level]
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        img = self._osr.read_region((x0, y0), level, (int(w), int(h)))
        return _to_rgb(np.asarray(img)), x0 / ds, y0 / ds

    def close(self) -> None:
        self._osr.close()


class TiffSlideHandle:
    """tiffslide (tifffile + zarr): SVS, generic TIFF, OME-TIFF, NDPI; reads level arrays directly."""

    name = "tiffslide"

    def __init__(self, path: str) -> None:
        import tiffslide

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tifffile/tiffslide warn about NDPI and partial support on open
            self._ts = tiffslide.TiffSlide(path)
            self._levels = [self._ts.zarr_group[str(i)] for i in range(self._ts.level_count)]
            self.properties = {k: v for k, v in self._ts.properties.items()}
        shape = self._levels[0].shape
        if len(shape) != 3 or shape[2] not in (1, 3, 4):
            raise ValueError(f"pixel layout {shape} is not an RGB image (multi-channel fluorescence is unsupported)")
        self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        self.reported_downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        self.vendor = self.properties.get("tiffslide.vendor")
        self.ome_xml = self._ts.ts_tifffile.ome_metadata if self._ts.ts_tifffile.is_ome else None

    def associated_names(self) -> list[str]:
        return list(self._ts.associated_images.keys())

    def read_associated(self, name: str) -> np.ndarray:
        return _to_rgb(np.asarray(self._ts.associated_images[name]))

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, float, float]:
        arr = np.asarray(self._levels[level][y:y + h, x:x + w])
        return _to_rgb(arr), float(x), float(y)

    def close(self) -> None:
        self._ts.close()


def open_handle(backend: str, path: str) -> BackendHandle:
    """Open ``path`` with the named backend (errors propagate from the library)."""
    if backend == "openslide":
        return OpenSlideHandle(path)
    if backend == "tiffslide":
        return TiffSlideHandle(path)
    raise ValueError(backend)


def auto_order(path: Path) -> tuple[str, ...]:
    """Backends to try for ``path``, most suitable first.

    openslide for DICOM (a folder or a ``.dcm``), NDPI, SVS and the other vendor formats it alone reads;
    tiffslide for OME-TIFF (openslide does not read OME); generic TIFF goes to openslide first (C decoder),
    then tiffslide.
    """
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return ("openslide",)
    if name.endswith((".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf")):
        return ("tiffslide", "openslide")
    return ("openslide", "tiffslide")


def dicom_entry(path: Path) -> Path:
    """The file openslide should open for a DICOM folder: any instance of the series (openslide finds the rest)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{path}: the folder holds no DICOM files")
    # prefer the largest instance: it is the full-resolution VOLUME image
    return max(files, key=lambda p: os.path.getsize(p))
