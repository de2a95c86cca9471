"""Thin adapters over the two slide libraries, openslide and tiffslide.

Each adapter answers the same few questions (level sizes, properties, associated images) and reads one window
of one pyramid level in *level* pixel coordinates. All geometry (which level, resampling, out-of-bounds fill)
lives in :mod:`xtpath.io.slide`, so both libraries are driven the same way.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
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
        alpha = arr[..., 3]
        rgb = np.ascontiguousarray(arr[..., :3])
        if alpha.min() == 255:  # fully opaque: the usual case inside a slide
            return rgb
        a = alpha[..., None].astype(np.uint16)  # composite on white, in integers: rgb*a/255 + (255 - a)
        return ((rgb * a + 127) // 255 + (255 - a)).astype(np.uint8)
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
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._pages = self._direct_pages()

    def associated_names(self) -> list[str]:
        return list(self._ts.associated_images.keys())

    def read_associated(self, name: str) -> np.ndarray:
        return _to_rgb(np.asarray(self._ts.associated_images[name]))

    # Decoded tiles are kept in a bounded LRU cache: regions overlap the same tiles (a 448-px region over 256-px
    # tiles decodes 7.5 tiles on average, 2.5 times the pixels it needs), and napari asks for tiles repeatedly.
    cache_bytes = 128 * 2**20

    def _tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        key = (level, ty, tx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        arr = self._levels[level]
        th, tw = arr.chunks[0], arr.chunks[1]
        tile = self._decode_tile(level, ty, tx, th, tw) if self._pages is not None else None
        if tile is None:
            tile = _to_rgb(np.asarray(arr[ty * th:(ty + 1) * th, tx * tw:(tx + 1) * tw]))
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return tile

    def _direct_pages(self) -> list[Any] | None:
        """The TIFF page of each level when tiles can be decoded straight from the file (one tiled page per
        level, tiles as zarr chunks); ``None`` otherwise (zarr is used then)."""
        try:
            tf = self._ts.ts_tifffile
            if self.properties.get("tiffslide.series-composition") or tf.is_ndpi:  # NDPI: virtual JPEG tiles
                return None
            series = tf.series[int(self.properties.get("tiffslide.series-index", 0) or 0)]
            pages = []
            for lvl, arr in zip(series.levels, self._levels):
                page = lvl.pages[0] if len(lvl.pages) == 1 else None
                if page is None or not page.is_tiled or page.planarconfig != 1 or page.imagedepth != 1:
                    return None
                if (page.tilelength, page.tilewidth) != tuple(arr.chunks[:2]) or page.shape[:2] != arr.shape[:2]:
                    return None
                pages.append(page)
            return pages if len(pages) == len(self._levels) else None
        except Exception:
            return None

    def _decode_tile(self, level: int, ty: int, tx: int, th: int, tw: int) -> np.ndarray | None:
        # zarr v3 costs ~1.2 ms per chunk in its async machinery; tifffile decodes a 256-px JPEG tile in 0.46 ms
        page = self._pages[level]  # type: ignore[index]
        n_x = -(-page.shape[1] // tw)
        index = ty * n_x + tx
        fh = self._ts.ts_tifffile.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
        if tile is None:  # an empty tile
            return None
        tile = tile.reshape(tile.shape[-3:]) if tile.ndim > 3 else tile
        return _to_rgb(tile[: min(th, page.shape[0] - ty * th), : min(tw, page.shape[1] - tx * tw)])

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, float, float]:
        arr = self._levels[level]
        th, tw = arr.chunks[0], arr.chunks[1]
        out = np.empty((h, w, 3), dtype=np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._tile(level, ty, tx)
                y0, x0 = max(y, ty * th), max(x, tx * tw)
                y1, x1 = min(y + h, ty * th + tile.shape[0]), min(x + w, tx * tw + tile.shape[1])
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
        return out, float(x), float(y)

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

    openslide for DICOM (a folder or a ``.dcm``), NDPI, SVS and the other vendor formats; tiffslide first for
    ``.tif``/``.tiff`` (OME-TIFF, which openslide does not read, and generic tiled TIFF), then openslide.
    """
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return ("openslide",)
    if name.endswith((".tif", ".tiff", ".btf", ".tf2", ".tf8")):
        # OME-TIFF (openslide does not read it) and generic tiled TIFF: tiffslide reads them directly from the
        # tiles (5 ms vs 7.5 ms per 224-px region at 0.5 µm/px from a 0.25 µm/px JPEG TIFF, measured)
        return ("tiffslide", "openslide")
    return ("openslide", "tiffslide")


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_entry(path: Path) -> Path:
    """The file openslide should open for a DICOM folder: any instance of the series (openslide finds the rest)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:  # instances without the extension (PACS exports): the DICOM preamble says which they are
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_dicom(p))
    if not files:
        raise FileNotFoundError(f"{path}: the folder holds no DICOM files")
    # prefer the largest instance: it is the full-resolution VOLUME image
    return max(files, key=lambda p: os.path.getsize(p))
