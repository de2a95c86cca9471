"""Nested tokenization geometry: the slide cut into regions, each region into encoder-sized sub-regions.

Pure geometry on numbers (no slide reads). A *region* is a square of ``region_px`` pixels at ``target_mpp``;
regions sit on a grid anchored at the slide's top-left corner, region ``(row, col)`` covering level-0
``[col*S, (col+1)*S) x [row*S, (row+1)*S)`` with ``S = region_px * target_mpp / slide_mpp`` level-0 pixels
(per axis). Each region is split into ``k x k`` sub-regions, ``k = max(1, round(region_px / encoder_px))``,
which the region encoder reads at its own input size (``encoder_px``), i.e. at
``read_mpp = target_mpp * (region_px / k) / encoder_px``: a 512-px region for a 256-px encoder gives 2x2
sub-regions read at ``target_mpp``; a 256-px region for a 224-px encoder gives one read at ``target_mpp*256/224``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from xtpath.errors import InvalidParameterError

if TYPE_CHECKING:
    from xtpath.tissue import TissueMask

__all__ = ["RegionGrid", "make_region_grid", "subregion_boxes", "hilbert_index", "ORDERS", "EDGES",
           "check_resolution", "MAX_UPSAMPLE", "encoder_reads"]

ORDERS = ("raster", "hilbert")


def encoder_reads(target_mpp: float, region_px: int, encoder_px: int) -> tuple[int, float]:
    """``(k, read_mpp)``: a region is read as ``k x k`` encoder inputs of ``encoder_px`` pixels at ``read_mpp``
    (``target_mpp`` itself only when ``region_px`` is ``k * encoder_px``; see the module docstring)."""
    k = max(1, int(round(region_px / encoder_px)))
    return k, target_mpp * (region_px / k) / encoder_px

EDGES = ("pad", "drop")


@dataclass
class RegionGrid:
    """The regions kept on one slide.

    Attributes
    ----------
    coords : (N, 2) int64
        Level-0 ``(x, y)`` of each region's top-left corner, rounded to whole pixels (as CLAM/TRIDENT store).
    grid : (N, 2) int64
        ``(row, col)`` of each region on the region grid.
    tissue : (N,) float32
        Tissue fraction of each region (1.0 everywhere when no mask was given).
    region_size : (float, float)
        Region width and height in level-0 pixels (exact; ``region_px * target_mpp / slide_mpp``).
    region_px, encoder_px, target_mpp, slide_mpp, slide_dimensions, grid_shape, order, edge
        The inputs and the full grid's ``(rows, cols)``.
    """

    coords: np.ndarray
    grid: np.ndarray
    tissue: np.ndarray
    region_size: tuple[float, float]
    region_px: int
    encoder_px: int
    target_mpp: float
    slide_mpp: tuple[float, float]
    slide_dimensions: tuple[int, int]
    grid_shape: tuple[int, int]
    order: str = "raster"
    edge: str = "pad"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def subregions_per_side(self) -> int:
        """``k``: each region is read as ``k x k`` encoder inputs."""
        return encoder_reads(self.target_mpp, self.region_px, self.encoder_px)[0]

    @property
    def read_mpp(self) -> float:
        """Microns per pixel at which the encoder's ``encoder_px`` inputs are read."""
        return encoder_reads(self.target_mpp, self.region_px, self.encoder_px)[1]

    @property
    def read_px(self) -> int:
        """Side in pixels of one whole region read at :attr:`read_mpp` (``k * encoder_px``)."""
        return self.subregions_per_side * self.encoder_px

    def locations(self) -> np.ndarray:
        """Exact (unrounded) level-0 ``(x, y)`` of each region, float64 ``(N, 2)``: use these for reading."""
        cols, rows = self.grid[:, 1].astype(np.float64), self.grid[:, 0].astype(np.float64)
        return np.stack([cols * self.region_size[0], rows * self.region_size[1]], axis=1)

    def boxes(self) -> np.ndarray:
        """Level-0 ``(x, y, w, h)`` of each region, float64 ``(N, 4)``."""
        loc = self.locations()
        wh = np.broadcast_to(np.asarray(self.region_size, dtype=np.float64), loc.shape)
        return np.concatenate([loc, wh], axis=1)

    def take(self, index: np.ndarray) -> "RegionGrid":
        """A copy holding only the regions at ``index`` (an int index array or a bool mask), in that order."""
        from dataclasses import replace

        return replace(self, coords=self.coords[index], grid=self.grid[index], tissue=self.tissue[index])


def hilbert_index(rows: np.ndarray, cols: np.ndarray, order: int | None = None) -> np.ndarray:
    """Position of each ``(row, col)`` along a Hilbert curve over a ``2**order`` square (vectorised).

    Neighbouring indices are always grid neighbours, so a sequence model sees most spatial neighbours close by.
    """
    r = np.asarray(rows, dtype=np.int64).copy()
    c = np.asarray(cols, dtype=np.int64).copy()
    if order is None:
        side = int(max(r.max(initial=0), c.max(initial=0))) + 1
        order = max(1, math.ceil(math.log2(side))) if side > 1 else 1
    n = 1 << order
    x, y = c, r
    d = np.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = ((x & s) > 0).astype(np.int64)
        ry = ((y & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant
        flip = ry == 0
        swap_x = flip & (rx == 1)
        x = np.where(swap_x, s - 1 - x, x)
        y = np.where(swap_x, s - 1 - y, y)
        x, y = np.where(flip, y, x), np.where(flip, x, y)
        s >>= 1
    return d


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise InvalidParameterError(f"{name}={value!r} must be a positive number")


MAX_UPSAMPLE = 4.0
"""How much finer than a slide's level 0 regions may be read. Beyond it the regions are a few real pixels blown
up: the sign of a wrong mpp (millimetres for microns) or of a thumbnail-only file, not of a useful request."""


def check_resolution(where: object, slide_mpp: float | tuple[float, float], target_mpp: float,
                     region_px: int, slide_dimensions: tuple[int, int] | None = None) -> None:
    """Raise when ``target_mpp`` is more than :data:`MAX_UPSAMPLE` times finer than the slide's level 0, or
    when the whole slide is smaller than one region (both signs of a wrong mpp)."""
    _check_positive("target_mpp", target_mpp)
    _check_positive("region_px", region_px)
    mx, my = slide_mpp if isinstance(slide_mpp, tuple) else (float(slide_mpp), float(slide_mpp))
    if slide_dimensions is not None:
        w_um, h_um = slide_dimensions[0] * mx, slide_dimensions[1] * my
        region_um = target_mpp * region_px
        if max(w_um, h_um) < region_um:
            raise InvalidParameterError(
                f"{where}: the whole slide is {w_um:.4g} x {h_um:.4g} µm at {mx:.4g} µm/px, smaller than one region "
                f"({region_um:.4g} µm); check the slide's mpp (microns per pixel, not millimetres) or use a "
                "finer --target-mpp or smaller --region-px")
    coarsest = max(mx, my)
    factor = coarsest / float(target_mpp)
    if factor > MAX_UPSAMPLE:
        raise InvalidParameterError(
            f"{where}: level 0 is {coarsest:.4g} µm/px, {factor:.3g}x coarser than --target-mpp {target_mpp:g}, so "
            f"every region would be about {region_px / factor:.0f} real pixels blown up to {region_px}; check the "
            "slide's mpp (the CSV's mpp column is in microns per pixel) or use a coarser --target-mpp")


def make_region_grid(slide_dimensions: tuple[int, int], slide_mpp: float | tuple[float, float],
                     target_mpp: float, region_px: int, *, encoder_px: int | None = None,
                     tissue: "TissueMask | None" = None, min_tissue: float = 0.25,
                     edge: Literal["pad", "drop"] = "pad",
                     order: Literal["raster", "hilbert"] = "raster") -> RegionGrid:
    """Cut a slide into regions and keep those with tissue.

    Parameters
    ----------
    slide_dimensions : (int, int)
        Level-0 width and height in pixels.
    slide_mpp : float or (float, float)
        Microns per level-0 pixel.
    target_mpp : float
        Microns per pixel at which regions are defined (e.g. 0.5 for "20x").
    region_px : int
        Region side in pixels at ``target_mpp``.
    encoder_px : int, optional
        Input side of the region encoder (default ``region_px``: one encoder input per region).
    tissue : TissueMask, optional
        Keep only regions whose tissue fraction is at least ``min_tissue`` (and above 0). Without a mask every
        region is kept with fraction 1.
    min_tissue : float
        Smallest tissue fraction (0..1) of a kept region (0.25, as extract, train and tile); 0 keeps every
        region touching tissue.
    edge : {"pad", "drop"}
        Partial regions at the right and bottom edges: keep them (the part outside the slide reads as white
        background) or drop them.
    order : {"raster", "hilbert"}
        Order of the returned regions: row by row, or along a Hilbert curve.

    Returns
    -------
    RegionGrid
    """
    W, H = (int(v) for v in slide_dimensions)
    if W <= 0 or H <= 0:
        raise InvalidParameterError(f"slide_dimensions={slide_dimensions!r} must be positive")
    if slide_mpp is None:
        raise InvalidParameterError("slide_mpp is None: the slide records no microns per pixel; give it (the slides "
                                    "CSV's mpp column, or open_slide(path, mpp=...))")
    mx, my = (slide_mpp, slide_mpp) if np.isscalar(slide_mpp) else slide_mpp  # type: ignore[misc]
    for name, v in (("slide_mpp", mx), ("slide_mpp", my), ("target_mpp", target_mpp), ("region_px", region_px)):
        _check_positive(name, v)
    encoder_px = int(region_px if encoder_px is None else encoder_px)
    _check_positive("encoder_px", encoder_px)
    if not 0.0 <= min_tissue <= 1.0:
        raise InvalidParameterError(f"min_tissue={min_tissue!r} must be a fraction between 0 and 1")
    if edge not in EDGES:
        raise InvalidParameterError(f"edge={edge!r} is unknown; use one of {', '.join(EDGES)}")
    if order not in ORDERS:
        raise InvalidParameterError(f"order={order!r} is unknown; use one of {', '.join(ORDERS)}")
    sx, sy = region_px * target_mpp / mx, region_px * target_mpp / my
    if edge == "pad":  # every level-0 pixel in some region
        cols, rows = math.ceil(W / sx - 1e-9), math.ceil(H / sy - 1e-9)
    else:  # only whole regions
        cols, rows = math.floor(W / sx + 1e-9), math.floor(H / sy + 1e-9)
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], axis=1)
    loc = np.stack([grid[:, 1] * sx, grid[:, 0] * sy], axis=1)
    if tissue is not None:
        boxes = np.concatenate([loc, np.broadcast_to([sx, sy], loc.shape)], axis=1)
        frac = tissue.fraction(boxes).astype(np.float32)
        keep = (frac >= min_tissue) & (frac > 0)
    else:
        frac = np.ones(len(grid), dtype=np.float32)
        keep = np.ones(len(grid), dtype=bool)
    grid, loc, frac = grid[keep], loc[keep], frac[keep]
    if order == "hilbert" and len(grid):
        idx = np.argsort(hilbert_index(grid[:, 0], grid[:, 1]), kind="stable")
        grid, loc, frac = grid[idx], loc[idx], frac[idx]
    return RegionGrid(coords=np.rint(loc).astype(np.int64), grid=grid, tissue=frac, region_size=(sx, sy),
                      region_px=int(region_px), encoder_px=encoder_px, target_mpp=float(target_mpp),
                      slide_mpp=(float(mx), float(my)), slide_dimensions=(W, H), grid_shape=(rows, cols),
                      order=order, edge=edge)


def subregion_boxes(regions: RegionGrid) -> np.ndarray:
    """Level-0 ``(x, y, w, h)`` of every sub-region, shape ``(N, k*k, 4)``, row-major inside each region."""
    k = regions.subregions_per_side
    loc = regions.locations()
    sw, sh = regions.region_size[0] / k, regions.region_size[1] / k
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    off = np.stack([j.ravel() * sw, i.ravel() * sh], axis=1)  # (k*k, 2)
    xy = loc[:, None, :] + off[None, :, :]
    wh = np.broadcast_to(np.asarray([sw, sh]), xy.shape)
    return np.concatenate([xy, wh], axis=2)
