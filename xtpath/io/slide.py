"""One slide interface over openslide and tiffslide, reading regions at a target microns-per-pixel.

Geometry conventions (used everywhere in xtpath):

* ``location_xy`` is the top-left corner in **level-0 pixels** ``(x, y)``; floats are allowed.
* ``size_wh`` is the output size in pixels **at the requested resolution** (mpp, downsample or level).
* A pixel covers a unit square; output pixel ``(i, j)`` covers level-0 ``[x + j*s, x + (j+1)*s)`` along x,
  where ``s`` is level-0 pixels per output pixel.

Each pyramid level is placed by its *pixel grid scale*: scanners make level ``k`` by shrinking level 0 by an
integer factor and then cut the last partial pixel, so the ratio of the stored sizes (e.g. 4443/2221 = 2.0005
for the TCGA JPEG2000 slide in the tests) is not the factor the pixels were made with (2). Placing level-1
pixels at 2.0005 shifts them by one level-0 pixel every 2000; we measured the wrong factor to double the error
of a level-1 read against a level-0 read at the far corner of that slide. When the sizes are consistent with an
integer factor (``|W0/k - Wk| < 1`` on both axes) that factor is used; otherwise the exact per-axis ratio.
``level_downsamples`` still reports the libraries' ratio, as openslide does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xtpath.errors import (
    CorruptRegionError,
    InvalidParameterError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedSlideError,
)
from xtpath.io._backends import BACKENDS, BackendHandle, auto_order, dicom_entry, open_handle
from xtpath.io.metadata import MppInfo, objective_power, resolve_mpp

__all__ = ["Slide", "open_slide", "slide_name"]

# A single backend read never decodes more than this many level pixels; larger requests are split into tiles
# (at the output resolution, with enough overlap for the filter) so memory stays bounded on gigapixel slides.
_MAX_WINDOW_PX = 4096 * 4096
_TOL = 1e-6
_THUMB_LEVEL_PX = 32 * 2**20  # thumbnails read a whole pyramid level up to this size at once


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Hold back tifffile's log messages while a file is being tried (what matters is raised and reported)."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def slide_name(path: str | os.PathLike[str]) -> str:
    """A slide's name for output files: the file name without its (double) extension, or the DICOM folder."""
    p = Path(path)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem if p.suffix else name


def _grid_scale(w0: int, h0: int, wl: int, hl: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of a level of size ``(wl, hl)`` (see the module docstring)."""
    rx, ry = w0 / wl, h0 / hl
    k = round((rx + ry) / 2.0)
    if k >= 1 and abs(w0 / k - wl) < 1.0 and abs(h0 / k - hl) < 1.0:
        return float(k), float(k)
    return rx, ry


#: Largest region :meth:`Slide.read_region` returns, in output pixels (3 GB of RGB): a bigger request is almost
#: always a mistake (level-0 size at a coarse mpp...), and would fail in numpy with a bare MemoryError.
MAX_READ_PX = 1 << 30

class _AssociatedImages(Mapping[str, np.ndarray]):
    """Label, macro, thumbnail ... images stored in the slide file, decoded on access as RGB arrays."""

    def __init__(self, slide: "Slide") -> None:
        self._slide = slide

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._slide._assoc_names:
            raise KeyError(name)
        return self._slide._handle().read_associated(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._slide._assoc_names)

    def __len__(self) -> int:
        return len(self._slide._assoc_names)


class Slide:
    """A whole-slide image opened with openslide or tiffslide.

    Use :func:`open_slide` to create one. A ``Slide`` is safe to share between threads (each thread gets its
    own library handle where the library needs it) and to pass to DataLoader worker processes: it pickles as
    its path and options, and a process that did not open it reopens the file on first read.

    Attributes
    ----------
    path : pathlib.Path
        What was opened (a file, or a DICOM folder).
    name : str
        Slide name used for output files.
    backend : str
        ``"openslide"`` or ``"tiffslide"``.
    vendor : str or None
        Format/vendor reported by the library (``"aperio"``, ``"hamamatsu"``, ``"dicom"``, ...).
    dimensions : (int, int)
        Level-0 width and height in pixels.
    level_count, level_dimensions, level_downsamples
        The pyramid; downsamples are the libraries' exact size ratios (not rounded).
    mpp : (float, float) or None
        Microns per level-0 pixel along x and y; ``None`` if neither the file nor the user gives one.
    mpp_source : str
        Where :attr:`mpp` came from.
    objective_power : float or None
    properties : dict
        The library's raw metadata.
    """

    def __init__(self, path: Path, backend: str, handle: BackendHandle, mpp_override: Any = None) -> None:
        self.path = path
        self.name = slide_name(path)
        self.backend = backend
        self._mpp_override = mpp_override
        self._open_target = str(dicom_entry(path)) if path.is_dir() else str(path)
        self._init_metadata(handle)
        self._pid = os.getpid()
        self._local = threading.local()
        self._shared: BackendHandle | None = handle if backend == "openslide" else None
        if backend != "openslide":
            self._local.handle = handle

    # -- metadata ---------------------------------------------------------------------------------------------
    def _init_metadata(self, h: BackendHandle) -> None:
        self.level_dimensions: tuple[tuple[int, int], ...] = h.level_dimensions
        self.level_downsamples: tuple[float, ...] = h.reported_downsamples
        self.level_count = len(self.level_dimensions)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        self.properties: dict[str, Any] = dict(h.properties)
        self.vendor = h.vendor or ("ome-tiff" if getattr(h, "ome_xml", None) else "generic-tiff")
        self.mpp_info: MppInfo = resolve_mpp(self.properties, vendor=h.vendor, ome_xml=getattr(h, "ome_xml", None),
                                             override=self._mpp_override)
        self.objective_power = objective_power(self.properties)
        self._assoc_names = h.associated_names()
        w0, h0 = self.dimensions
        self._scales = tuple(_grid_scale(w0, h0, w, hh) for (w, hh) in self.level_dimensions)

    @property
    def mpp(self) -> tuple[float, float] | None:
        return (self.mpp_info.x, self.mpp_info.y) if self.mpp_info.known else None  # type: ignore[return-value]

    @property
    def mpp_source(self) -> str:
        return self.mpp_info.source

    @cached_property
    def associated_images(self) -> Mapping[str, np.ndarray]:
        return _AssociatedImages(self)

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level`` along x and y (the pixel grid's scale, see module docs)."""
        self._check_level(level)
        return self._scales[level]

    def require_mpp(self) -> tuple[float, float]:
        """:attr:`mpp`, or :class:`MissingMppError` telling the user how to give one."""
        if self.mpp is None:
            why = f" ({self.mpp_info.note})" if self.mpp_info.note else ""
            raise MissingMppError(
                f"{self.path}: no microns-per-pixel in the file{why}; give it in the 'mpp' column of the slides "
                "CSV (extract, train, score), with --mpp (info, tissue, tile) or mpp= (Python)")
        return self.mpp  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """Everything ``xtpath info`` prints, as plain JSON-able values."""
        return {
            "path": str(self.path),
            "name": self.name,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "level_grid_scales": [list(s) for s in self._scales],
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "mpp_note": self.mpp_info.note or None,
            "objective_power": self.objective_power,
            "associated_images": list(self._assoc_names),
        }

    # -- handles (per process; per thread for tiffslide) -------------------------------------------------------
    def _handle(self) -> BackendHandle:
        if os.getpid() != self._pid:  # a forked worker: never use the parent's handle
            self._pid = os.getpid()
            self._shared = None
            self._local = threading.local()
        if self.backend == "openslide":  # the C library is thread-safe: one handle per process
            if self._shared is None:
                self._shared = open_handle(self.backend, self._open_target)
            return self._shared
        h = getattr(self._local, "handle", None)
        if h is None:
            h = self._local.handle = open_handle(self.backend, self._open_target)
        return h

    def _drop_handle(self) -> None:
        # openslide puts a handle into a permanent error state after a decode error: start afresh next time.
        if self.backend == "openslide":
            self._shared = None
        else:
            self._local.handle = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_shared", "_local"):
            state.pop(k, None)
        state.pop("associated_images", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._shared = None
        self._local = threading.local()

    def close(self) -> None:
        for h in (self._shared, getattr(self._local, "handle", None)):
            if h is not None:
                h.close()
        self._shared = None
        self._local = threading.local()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp[0]:.4f}" if self.mpp else "unknown"
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, mpp={mpp})"

    # -- reading ----------------------------------------------------------------------------------------------
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise InvalidParameterError(
                f"level={level} does not exist in {self.path} (it has levels 0..{self.level_count - 1})")

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose pixels are no larger than ``downsample`` level-0 pixels."""
        fits = [i for i, s in enumerate(self._scales) if max(s) <= downsample * (1 + 1e-3)]
        return max(fits, key=lambda i: max(self._scales[i])) if fits else 0

    def read_region(self, location_xy: tuple[float, float], size_wh: tuple[int, int], *,
                    mpp: float | None = None, level: int | None = None,
                    downsample: float | tuple[float, float] | None = None,
                    source_level: int | None = None) -> np.ndarray:
        """Read a region as RGB pixels.

        Parameters
        ----------
        location_xy : (float, float)
            Top-left corner in level-0 pixels.
        size_wh : (int, int)
            Output width and height in pixels at the requested resolution.
        mpp : float, optional
            Output resolution in microns per pixel (needs the slide's mpp).
        level : int, optional
            Output at the resolution of this pyramid level.
        downsample : float or (float, float), optional
            Output at this many level-0 pixels per output pixel (per axis if a pair).
        source_level : int, optional
            Pyramid level to read from (default: the coarsest one at least as fine as the output).

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB. Areas outside the slide are white.
        """
        sx, sy = self._output_scale(mpp=mpp, level=level, downsample=downsample)
        try:
            w, h = (int(v) for v in size_wh)
            x, y = (float(v) for v in location_xy)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"read_region(location_xy={location_xy!r}, size_wh={size_wh!r}): give two "
                                        "numbers each, (x, y) in level-0 pixels and (width, height)") from None
        if w <= 0 or h <= 0:
            raise InvalidParameterError(f"size_wh={tuple(size_wh)} must be positive")
        if w * h > MAX_READ_PX:
            raise InvalidParameterError(f"size_wh={tuple(size_wh)}: {w * h / 1e6:,.0f} M pixels in one array is more "
                                        f"than read_region returns (at most {MAX_READ_PX / 1e6:,.0f} M); read it in "
                                        "tiles, or at a coarser mpp")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidParameterError(f"location_xy={tuple(location_xy)} must be finite")
        if source_level is None:
            src = self.best_level(min(sx, sy))
        else:
            self._check_level(source_level)
            src = source_level
        lsx, lsy = self._scales[src]
        rx, ry = sx / lsx, sy / lsy  # level pixels per output pixel
        # split big requests: each tile's backend window stays under _MAX_WINDOW_PX
        tile_w = max(16, int(math.sqrt(_MAX_WINDOW_PX) / max(rx, 1e-9)) - 16)
        tile_h = max(16, int(math.sqrt(_MAX_WINDOW_PX) / max(ry, 1e-9)) - 16)
        if w <= tile_w and h <= tile_h:
            return self._read_tile(x, y, w, h, sx, sy, src)
        out = np.empty((h, w, 3), dtype=np.uint8)
        for j0 in range(0, h, tile_h):
            for i0 in range(0, w, tile_w):
                tw, th = min(tile_w, w - i0), min(tile_h, h - j0)
                out[j0:j0 + th, i0:i0 + tw] = self._read_tile(x + i0 * sx, y + j0 * sy, tw, th, sx, sy, src)
        return out

    def _output_scale(self, *, mpp: float | None, level: int | None,
                      downsample: float | tuple[float, float] | None) -> tuple[float, float]:
        given = [n for n, v in (("mpp", mpp), ("level", level), ("downsample", downsample)) if v is not None]
        if len(given) > 1:
            raise InvalidParameterError(f"give one of mpp, level, downsample (got {', '.join(given)})")
        if mpp is not None:
            if not (mpp > 0 and math.isfinite(mpp)):
                raise InvalidParameterError(f"mpp={mpp!r} must be a positive number of microns per pixel")
            mx, my = self.require_mpp()
            return mpp / mx, mpp / my
        if downsample is not None:
            dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample  # type: ignore[misc]
            if not all(d > 0 and math.isfinite(d) for d in (dx, dy)):
                raise InvalidParameterError(f"downsample={downsample!r} must be positive")
            return float(dx), float(dy)
        lv = 0 if level is None else int(level)
        self._check_level(lv)
        return self._scales[lv]

    def _read_tile(self, x: float, y: float, w: int, h: int, sx: float, sy: float, src: int) -> np.ndarray:
        lsx, lsy = self._scales[src]
        lw, lh = self.level_dimensions[src]
        # the requested box in source-level pixel coordinates
        bx0, by0 = x / lsx, y / lsy
        bx1, by1 = (x + w * sx) / lsx, (y + h * sy) / lsy
        rx, ry = (bx1 - bx0) / w, (by1 - by0) / h
        # a plain crop when the output is the source level's own pixels (and the library can start there)
        exact = (abs(rx - 1) < _TOL and abs(ry - 1) < _TOL and abs(bx0 - round(bx0)) < _TOL
                 and abs(by0 - round(by0)) < _TOL
                 and (self.backend != "openslide" or float(self.level_downsamples[src]).is_integer()))
        # integer shrink factor on whole pixels (e.g. 0.5 µm/px from a 0.25 µm/px level): a box average, which is
        # how scanners make their own pyramid levels, and ten times cheaper than the general filter
        fx_i, fy_i = int(round(rx)), int(round(ry))
        box_avg = (not exact and fx_i >= 2 and fy_i >= 2 and abs(rx - fx_i) < _TOL and abs(ry - fy_i) < _TOL
                   and abs(bx0 - round(bx0)) < _TOL and abs(by0 - round(by0)) < _TOL
                   and (self.backend != "openslide" or float(self.level_downsamples[src]).is_integer()))
        if exact or box_avg:
            wx0, wy0 = int(round(bx0)), int(round(by0))
            wx1, wy1 = wx0 + w * (fx_i if box_avg else 1), wy0 + h * (fy_i if box_avg else 1)
        else:  # margin for the filter's support (Lanczos: 3 source pixels per output pixel when shrinking)
            px, py = int(math.ceil(3 * max(rx, 1.0))) + 2, int(math.ceil(3 * max(ry, 1.0))) + 2
            wx0, wy0 = int(math.floor(bx0)) - px, int(math.floor(by0)) - py
            wx1, wy1 = int(math.ceil(bx1)) + px, int(math.ceil(by1)) + py
        canvas = np.full((wy1 - wy0, wx1 - wx0, 3), 255, dtype=np.uint8)
        cx0, cy0, cx1, cy1 = max(wx0, 0), max(wy0, 0), min(wx1, lw), min(wy1, lh)
        ox, oy = float(wx0), float(wy0)  # level position of canvas pixel (0, 0)
        if cx1 > cx0 and cy1 > cy0:
            try:
                pix, fx, fy = self._handle().read_level(src, cx0, cy0, cx1 - cx0, cy1 - cy0)
            except Exception as e:  # decoder errors come as many types (OpenSlideError, Jpeg8Error, ...)
                self._drop_handle()
                raise CorruptRegionError(
                    f"{self.path}: cannot decode the region at level-0 (x={x:.0f}, y={y:.0f}), "
                    f"{w}x{h} px, pyramid level {src} ({type(e).__name__}: {e}); the file is damaged there: "
                    "re-export the slide or leave it out",
                    path=str(self.path), location_xy=(x, y), size_wh=(w, h), level=src) from e
            canvas[cy0 - wy0:cy1 - wy0, cx0 - wx0:cx1 - wx0] = pix
            # the library may start a fraction of a pixel off (openslide on non-integer downsamples)
            ox, oy = wx0 + (fx - cx0), wy0 + (fy - cy0)
        if exact and ox == wx0 and oy == wy0:
            return canvas
        if box_avg and ox == wx0 and oy == wy0:
            return np.asarray(Image.fromarray(canvas).reduce((fx_i, fy_i)))
        box = (bx0 - ox, by0 - oy, bx1 - ox, by1 - oy)
        return _lanczos(canvas, (w, h), box)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide, longest side ``max_size`` pixels, as RGB (read from the coarsest useful level)."""
        w0, h0 = self.dimensions
        ds = max(w0, h0) / float(max_size)
        ds = max(ds, 1.0)
        size = (max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds))))
        src = self.best_level(ds)
        lw, lh = self.level_dimensions[src]
        if lw * lh > _THUMB_LEVEL_PX:  # only huge levels: read in windows through the general filter
            return self.read_region((0, 0), size, downsample=ds)
        # a picture for people: the whole level at once, shrunk with Pillow's 8-bit Lanczos (the per-offset
        # rounding that read_region avoids cannot show in a single image); half the time of the float path
        level = self.read_region((0, 0), (lw, lh), level=src)
        return np.asarray(Image.fromarray(level).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))


def _lanczos(img: np.ndarray, size_wh: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Resample the sub-pixel ``box`` of an RGB uint8 image to ``size_wh`` with a Lanczos-3 filter.

    Runs Pillow's filter in float32 per channel: its 8-bit path rounds differently depending on where the box
    sits in the image (we measured up to 40 grey levels on noise), which would make tiled reads show seams.
    """
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                        .resize(size_wh, Image.Resampling.LANCZOS, box=box)) for c in range(img.shape[2])]
    return np.clip(np.rint(np.stack(chans, axis=-1)), 0, 255).astype(np.uint8)


def open_slide(path: str | os.PathLike[str], *, backend: str = "auto",
               mpp: float | tuple[float, float] | None = None) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path : path-like
        A slide file (SVS, NDPI, TIFF, OME-TIFF, DICOM ``.dcm``, ...) or a folder of DICOM instances.
    backend : {"auto", "openslide", "tiffslide"}
        ``"auto"`` tries the library best suited to the format first and falls back to the other.
    mpp : float or (float, float), optional
        Microns per level-0 pixel, overriding the file (needed when the file has none).

    Raises
    ------
    SlideNotFoundError, UnsupportedSlideError, InvalidParameterError
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideNotFoundError(f"{p}: no such file or folder; check the path (relative paths in a slides CSV "
                                 "are relative to the CSV's folder)")
    if backend == "auto":
        order = auto_order(p)
    elif backend in BACKENDS:
        order = (backend,)
    else:
        raise InvalidParameterError(f"backend={backend!r} is unknown; use one of auto, {', '.join(BACKENDS)}")
    target = p
    if p.is_dir():
        if "openslide" not in order:
            raise UnsupportedSlideError(f"{p}: a folder can only be opened as DICOM, by openslide; use --backend "
                                        "auto or openslide (backend='openslide' in Python)")
        try:
            target = dicom_entry(p)
        except FileNotFoundError as e:
            raise UnsupportedSlideError(f"{p}: not a slide: the folder holds no DICOM files") from e
    elif p.stat().st_size == 0:
        raise UnsupportedSlideError(f"{p}: empty file (0 bytes); the copy or download did not finish, copy it again")
    reasons = []
    for name in order:
        try:
            with _quiet_tifffile():  # it logs what it then raises ("invalid offset to first page") on its own line
                handle = open_handle(name, str(target))
        except Exception as e:  # each library raises its own types for "not my format"
            reasons.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))
            continue
        return Slide(p, name, handle, mpp_override=mpp)
    hint = ("" if backend == "auto" else "try the other reader (--backend auto) or ") + \
        "check that the file is whole (a copy cut short reads like this) and a slide format (SVS, NDPI, TIFF, " \
        "OME-TIFF, DICOM, MRXS, ...)"
    raise UnsupportedSlideError(f"{p}: not a slide that xtpath can read ({'; '.join(reasons)}); {hint}")
