"""Tissue masks at low resolution (a few microns per pixel) with scikit-image.

Two detectors:

* ``"he"`` (brightfield, e.g. H&E or IHC): tissue is coloured, glass is white. Saturation (HSV, in 8 bits), median
  smoothing, Otsu threshold kept between ``min_saturation`` and ``max_saturation`` (so that a slide that is all
  tissue is not split in two), morphological closing, removal of small objects and small holes. This is CLAM's
  recipe with sizes in microns instead of pixels of some pyramid level.
* ``"fluorescence"``: tissue is bright on a dark background. Grey level, median smoothing, Otsu threshold kept
  between ``min_intensity`` and ``max_intensity``, then the same clean-up.

``mode="auto"`` picks fluorescence when the slide is mostly dark. The mask is computed from a whole-slide read
at ``mask_mpp``, which :meth:`xtpath.io.Slide.read_region` serves from the coarsest suitable pyramid level in
bounded-size tiles, so level 0 is never held in memory whole.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xtpath.errors import InvalidParameterError
from xtpath.io import Slide
from xtpath.io.files import atomic_path
from xtpath.io.geojson import mask_polygons, polygon_feature, write_geojson

__all__ = ["TissueParams", "TissueMask", "PRESETS", "detect_tissue", "tissue_params", "save_tissue_outputs"]

TISSUE_COLOR = (0, 200, 70)


@dataclass(frozen=True)
class TissueParams:
    """Settings of the tissue detector. Sizes are in microns so they mean the same on every scanner."""

    mode: Literal["auto", "he", "fluorescence"] = "auto"
    """Detector: brightfield (``"he"``), bright-on-dark (``"fluorescence"``) or chosen from the image."""
    mask_mpp: float = 8.0
    """Resolution of the mask in microns per pixel (coarser if the slide itself is coarser)."""
    min_saturation: float = 0.05
    """H&E: lowest saturation threshold (0..1), so that an empty slide gives an empty mask."""
    max_saturation: float = 0.15
    """H&E: highest saturation threshold, so that a slide (or crop) that is all tissue is not split in two by
    Otsu's method, which assumes tissue and glass are both present."""
    min_intensity: float = 0.08
    """Fluorescence: lowest grey-level threshold (0..1)."""
    max_intensity: float = 0.3
    """Fluorescence: highest grey-level threshold (0..1)."""
    median_um: float = 48.0
    """Width of the median filter applied before thresholding, in microns."""
    close_um: float = 32.0
    """Radius of the morphological closing that joins nearby tissue, in microns (0 disables)."""
    min_area_um2: float = 20_000.0
    """Tissue pieces smaller than this area (µm²) are removed (20 000 µm² is a 140-µm square)."""
    max_hole_um2: float = 20_000.0
    """Holes smaller than this area (µm²) are filled."""


PRESETS: dict[str, TissueParams] = {
    "default": TissueParams(),
    # needle biopsies: thin, small fragments; keep small pieces, join less
    "biopsy": TissueParams(median_um=32.0, close_um=16.0, min_area_um2=5_000.0, max_hole_um2=5_000.0),
    # resections: large sections; drop debris, fill larger holes (vessels, fat)
    "resection": TissueParams(median_um=64.0, close_um=48.0, min_area_um2=200_000.0, max_hole_um2=100_000.0),
}


def tissue_params(preset: str = "default", **overrides: Any) -> TissueParams:
    """Parameters of a named preset (``default``, ``biopsy``, ``resection``) with field overrides."""
    if preset not in PRESETS:
        raise InvalidParameterError(f"tissue preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    fields = set(TissueParams.__dataclass_fields__)
    bad = sorted(set(overrides) - fields)
    if bad:
        raise InvalidParameterError(f"unknown tissue parameter(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TissueMask:
    """A tissue mask and where it lies on the slide.

    Attributes
    ----------
    mask : (H, W) bool array
        Mask pixel ``(r, c)`` covers level-0 ``[c*dx, (c+1)*dx) x [r*dy, (r+1)*dy)``.
    downsample : (float, float)
        Level-0 pixels per mask pixel ``(dx, dy)``.
    mpp : (float, float)
        Microns per mask pixel.
    slide_dimensions : (int, int)
        Level-0 width and height of the slide.
    mode : str
        Detector used (``"he"`` or ``"fluorescence"``).
    threshold : float
        Threshold applied (0..1).
    params : TissueParams
    image : (H, W, 3) uint8 array or None
        The slide at mask resolution, kept for the QC picture.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    mpp: tuple[float, float]
    slide_dimensions: tuple[int, int]
    mode: str
    threshold: float
    params: TissueParams
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm² (inside the slide: the last mask row and column may reach past its edge)."""
        W, H = self.slide_dimensions
        level0_um2 = (self.mpp[0] / self.downsample[0]) * (self.mpp[1] / self.downsample[1])
        return float(self.fraction(np.array([[0.0, 0.0, W, H]]))[0]) * W * H * level0_um2 / 1e6

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())

    def fraction(self, boxes_xywh: np.ndarray) -> np.ndarray:
        """Tissue fraction (0..1) of level-0 boxes ``(x, y, w, h)``, shape ``(N, 4)`` -> ``(N,)``.

        Computed exactly on the mask grid: each mask pixel counts by the share of its area inside the box.
        Parts of a box outside the slide count as no tissue.
        """
        boxes = np.asarray(boxes_xywh, dtype=np.float64)
        if boxes.size % 4 or (boxes.ndim > 1 and boxes.shape[-1] != 4):
            raise InvalidParameterError(f"TissueMask.fraction: boxes must be (N, 4) rows of level-0 (x, y, w, h), "
                                        f"got shape {boxes.shape}; for region corners add the region size as w, h")
        boxes = boxes.reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros(0)
        m = self.mask.astype(np.float64)
        # integral image with a zero row/column in front: S[r, c] = sum of m[:r, :c]
        S = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
        S[1:, 1:] = m.cumsum(0).cumsum(1)
        dx, dy = self.downsample
        x0, y0 = boxes[:, 0] / dx, boxes[:, 1] / dy
        x1, y1 = (boxes[:, 0] + boxes[:, 2]) / dx, (boxes[:, 1] + boxes[:, 3]) / dy
        # the last mask row/column may reach past the slide: count tissue inside the slide only
        W, H = self.slide_dimensions[0] / dx, self.slide_dimensions[1] / dy
        total = _area_sum(S, np.clip(x0, 0, W), np.clip(y0, 0, H), np.clip(x1, 0, W), np.clip(y1, 0, H))
        return np.clip(total / np.maximum((x1 - x0) * (y1 - y0), 1e-12), 0.0, 1.0)

    def polygons(self, tolerance: float = 0.5) -> list[list[list[list[float]]]]:
        """Tissue outline as polygons (exterior, holes) in level-0 pixel coordinates."""
        return mask_polygons(self.mask, self.downsample, tolerance=tolerance, clip_xy=self.slide_dimensions)

    def qc_image(self, max_size: int = 2048, min_size: int = 512) -> np.ndarray:
        """The slide at mask resolution with the tissue contour drawn in green, RGB uint8; at most ``max_size``
        pixels a side, and a small mask's pixels repeated until the image is about ``min_size`` (for a person to
        look at)."""
        from skimage.morphology import dilation, disk
        from skimage.segmentation import find_boundaries

        img = self.image if self.image is not None else np.full((*self.mask.shape, 3), 255, np.uint8)
        img = img.copy()
        edge = find_boundaries(self.mask, mode="inner")
        thick = max(1, int(round(max(img.shape[:2]) / 600)))
        if thick > 1:
            edge = dilation(edge, disk(thick - 1))
        img[edge] = TISSUE_COLOR
        scale = max(img.shape[:2]) / max_size
        if scale > 1:
            from PIL import Image

            size = (max(1, int(img.shape[1] / scale)), max(1, int(img.shape[0] / scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
        repeat = min_size // max(img.shape[:2])
        if repeat >= 2:
            img = np.repeat(np.repeat(img, repeat, axis=0), repeat, axis=1)
        return img


def _area_sum(S: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Sum of the mask over fractional boxes, from its integral image ``S`` (bilinear in the corners)."""
    H, W = S.shape[0] - 1, S.shape[1] - 1

    def F(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # integral of the piecewise-constant mask over [0, x) x [0, y), exact for fractional x, y
        x = np.clip(x, 0, W)
        y = np.clip(y, 0, H)
        xi, yi = np.floor(x).astype(int), np.floor(y).astype(int)
        fx, fy = x - xi, y - yi
        xi1, yi1 = np.minimum(xi + 1, W), np.minimum(yi + 1, H)
        s00, s10, s01, s11 = S[yi, xi], S[yi, xi1], S[yi1, xi], S[yi1, xi1]
        return (s00 * (1 - fx) * (1 - fy) + s10 * fx * (1 - fy) + s01 * (1 - fx) * fy + s11 * fx * fy)

    return F(x1, y1) - F(x0, y1) - F(x1, y0) + F(x0, y0)


def _disk_px(um: float, mpp: float) -> int:
    return max(0, int(round(um / mpp / 2.0)))


def _close_disk(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary closing by a disk of radius ``r`` pixels (skimage's ``disk(r)``), from two Euclidean distance
    transforms: the same pixels as the structuring-element closing, in time independent of ``r``."""
    from scipy import ndimage as ndi

    padded = np.pad(mask, r)
    grown = ndi.distance_transform_edt(~padded) <= r
    if grown.all():
        return np.ones_like(mask)
    return (ndi.distance_transform_edt(grown) > r)[r:-r, r:-r]


def detect_tissue(slide: Slide | str | os.PathLike[str], params: TissueParams | None = None, *,
                  preset: str | None = None, keep_image: bool = True) -> TissueMask:
    """Find tissue on a slide.

    Parameters
    ----------
    slide : Slide or path
        Needs an mpp (from the file or ``open_slide(..., mpp=...)``); a path is opened (and closed) here.
    params : TissueParams, optional
        Detector settings (default: the ``preset``, or ``"default"``).
    preset : str, optional
        ``"default"``, ``"biopsy"`` or ``"resection"`` (ignored when ``params`` is given).
    keep_image : bool
        Keep the low-resolution slide image on the result (for the QC picture).

    Returns
    -------
    TissueMask
        An empty mask (and a ``UserWarning``) when the slide shows no tissue.
    """
    from scipy import ndimage as ndi
    from skimage.filters import rank, threshold_otsu
    from skimage.morphology import remove_small_objects

    if isinstance(slide, (str, os.PathLike)):
        from xtpath.io import open_slide

        with open_slide(slide) as opened:
            return detect_tissue(opened, params, preset=preset, keep_image=keep_image)
    if not isinstance(slide, Slide):
        raise InvalidParameterError(f"detect_tissue: slide={slide!r} is neither a Slide nor a path; open it with "
                                    "xtpath.open_slide")
    p = params if params is not None else tissue_params(preset or "default")
    if not p.mask_mpp > 0:
        raise InvalidParameterError(f"mask_mpp={p.mask_mpp} must be positive (microns per mask pixel)")
    smx, smy = slide.require_mpp()
    W0, H0 = slide.dimensions
    # never finer than the slide itself, nor so coarse that the mask has fewer than 16 px on its short side
    mask_mpp = max(min(p.mask_mpp, min(W0 * smx, H0 * smy) / 16), smx, smy)
    dx, dy = mask_mpp / smx, mask_mpp / smy
    w, h = max(1, int(math.ceil(W0 / dx))), max(1, int(math.ceil(H0 / dy)))
    img = slide.read_region((0, 0), (w, h), downsample=(dx, dy))
    mpp_xy = (dx * smx, dy * smy)

    mode = p.mode
    brightest = img.max(axis=2)  # uint8: HSV value
    if mode == "auto":
        mode = "fluorescence" if float(np.median(brightest)) < 0.3 * 255 else "he"
    # signals in uint8 (0..255): a 64k x 64k slide gives a 4096 x 4096 mask image, where float64 HSV would
    # take hundreds of MB
    if mode == "he":
        darkest = img.min(axis=2)
        spread = brightest.astype(np.uint16) - darkest
        signal = np.where(brightest > 0, (spread * 255 + brightest // 2) // np.maximum(brightest, 1), 0)
        signal = signal.astype(np.uint8)  # HSV saturation x 255
        floor, cap = p.min_saturation, p.max_saturation
    elif mode == "fluorescence":
        signal = brightest
        floor, cap = p.min_intensity, p.max_intensity
    else:
        raise InvalidParameterError(f"tissue mode {p.mode!r} is unknown; use auto, he or fluorescence")
    del brightest
    k = _disk_px(p.median_um, mask_mpp) * 2 + 1
    if k > 1:  # a sliding histogram: the time per pixel grows with k, not k² (fine masks have wide kernels)
        signal = rank.median(signal, np.ones((k, k), bool))
    try:
        thr = float(threshold_otsu(signal)) / 255.0 if int(signal.max()) > int(signal.min()) else 1.0
    except ValueError:
        thr = 1.0
    thr = min(max(thr, floor), max(cap, floor))
    mask = signal > thr * 255.0
    r = _disk_px(p.close_um * 2, mask_mpp)
    if r > 0 and mask.any():
        mask = _close_disk(mask, r)
    px_area = mask_mpp * mask_mpp
    min_obj = int(p.min_area_um2 / px_area)
    if min_obj > 0:
        mask = remove_small_objects(mask, max_size=min_obj)
    max_hole = int(p.max_hole_um2 / px_area)
    if max_hole > 0 and mask.any():
        # fill enclosed background pieces only (skimage's remove_small_holes also fills small background
        # regions that touch the image border, which would turn a near-empty slide into tissue)
        holes = ndi.binary_fill_holes(mask) & ~mask
        lab, n = ndi.label(holes)
        if n:
            small = np.bincount(lab.ravel()) <= max_hole
            small[0] = False
            mask = mask | small[lab]
    if not mask.any():
        warnings.warn(f"{slide.path}: no tissue found (mode={mode}, threshold={thr:.3f}); the mask is empty",
                      UserWarning, stacklevel=2)
    return TissueMask(mask=mask, downsample=(dx, dy), mpp=mpp_xy, slide_dimensions=(W0, H0), mode=mode,
                      threshold=thr, params=p, image=img if keep_image else None)


def save_tissue_outputs(tm: TissueMask, out_dir: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Write ``<name>_tissue.png`` (mask), ``<name>_qc.png`` (contour on the slide) and
    ``<name>_tissue.geojson`` (QuPath annotations in level-0 pixels) to ``out_dir``, atomically."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"mask": out / f"{name}_tissue.png", "qc": out / f"{name}_qc.png",
             "geojson": out / f"{name}_tissue.geojson"}
    dpi = (25400.0 / tm.mpp[0], 25400.0 / tm.mpp[1])
    with atomic_path(paths["mask"]) as tmp:
        Image.fromarray((tm.mask * 255).astype(np.uint8)).save(tmp, format="PNG", dpi=dpi)
    with atomic_path(paths["qc"]) as tmp:
        Image.fromarray(tm.qc_image()).save(tmp, format="PNG")
    feats = [polygon_feature(poly, object_type="annotation", name="Tissue", color=TISSUE_COLOR,
                             extra={"xtpath": {"mode": tm.mode, "mask_mpp": list(tm.mpp),
                                               "params": asdict(tm.params)}})
             for poly in tm.polygons()]
    write_geojson(paths["geojson"], feats)
    return paths
