"""Write pyramidal tiled TIFFs that openslide, tiffslide, QuPath and napari open.

Levels are stored as top-level pages (``subfiletype=1`` for the reduced ones), which is what openslide's
generic-TIFF reader expects; the resolution tags carry the mpp. Each level is made from the one above by 2x2
box averaging, with the last odd row/column dropped (``floor``), as scanners do.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xtpath.io.files import atomic_path

__all__ = ["write_pyramid_tiff", "downsample2", "downsample_labels2", "label_names_metadata", "read_label_names"]

# OME MapAnnotation namespace of the label value -> class name map of a label mask
LABEL_NAMESPACE = "xtpath/label-names"


def downsample2(img: np.ndarray) -> np.ndarray:
    """2x2 box average of an ``(H, W[, C])`` uint8 image to ``(H//2, W//2[, C])`` (rounded; an odd last
    row/column is dropped, as slide scanners do, so that level k holds level 0 shrunk by exactly 2**k)."""
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    a = img[:h, :w].astype(np.uint16)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def downsample_labels2(labels: np.ndarray) -> np.ndarray:
    """2x2 majority of an ``(H, W)`` label image to ``(H//2, W//2)`` (odd edge dropped, as
    :func:`downsample2`): every value is one of its four pixels' (averaging class indices would invent
    classes); ties go to the first of top-left, bottom-left, top-right, bottom-right."""
    h, w = (labels.shape[0] // 2) * 2, (labels.shape[1] // 2) * 2
    a = labels[:h, :w]
    cand = np.stack([a[0::2, 0::2], a[1::2, 0::2], a[0::2, 1::2], a[1::2, 1::2]])  # (4, h, w)
    votes = (cand[:, None] == cand[None, :]).sum(1)  # (4, h, w): how many of the four equal each one
    return np.take_along_axis(cand, votes.argmax(0)[None], 0)[0]


def write_pyramid_tiff(path: str | os.PathLike[str], image: np.ndarray, mpp: float | tuple[float, float], *,
                       tile: int = 256, compression: str | None = "jpeg", quality: int = 90,
                       min_size: int = 256, levels: int | None = None, ome: bool = False,
                       description: str | None = None, ome_metadata: dict | None = None) -> Path:
    """Write ``image`` (level 0) and its 2x pyramid as a tiled TIFF, atomically.

    Parameters
    ----------
    path : path-like
        Output file (``.tif``/``.tiff``; ``.ome.tif`` with ``ome=True``).
    image : (H, W, 3) uint8 RGB, or (H, W) uint8/uint16 labels
    mpp : float or (float, float)
        Microns per level-0 pixel, stored in the resolution tags (and OME PhysicalSize with ``ome=True``).
    tile : int
        Tile side (a multiple of 16).
    compression : {"jpeg", "zlib", None}
        ``"jpeg"`` for RGB pictures, ``"zlib"`` (deflate) for exact values such as label masks.
    min_size : int
        Stop adding levels when the longer side would fall below this.
    levels : int, optional
        Number of levels (default: until ``min_size``).
    ome : bool
        Write OME-XML metadata; reduced levels then go to SubIFDs, the OME-TIFF pyramid layout that QuPath,
        napari and tiffslide read (openslide does not read OME-TIFF).
    ome_metadata : dict, optional
        More OME-XML for the image, in tifffile's form (``Name``, ``Description``, ``MapAnnotation``, ...).
    """
    import tifffile

    mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp  # type: ignore[misc]
    pyramid = [np.ascontiguousarray(image)]
    while (levels is None and max(pyramid[-1].shape[:2]) // 2 >= min_size) or \
            (levels is not None and len(pyramid) < levels):
        if min(pyramid[-1].shape[:2]) < 2:
            break
        pyramid.append(downsample2(pyramid[-1]) if image.ndim == 3 else downsample_labels2(pyramid[-1]))
    rgb = image.ndim == 3
    opts: dict = {"tile": (tile, tile), "photometric": "rgb" if rgb else "minisblack"}
    if compression == "jpeg":
        opts["compression"] = "jpeg"
        opts["compressionargs"] = {"level": quality}
    elif compression:
        opts["compression"] = compression
    res = (1e4 / mx, 1e4 / my)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31, ome=ome) as tw:
            if ome:
                meta = {"PhysicalSizeX": mx, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": my,
                        "PhysicalSizeYUnit": "µm", "axes": "YXS" if rgb else "YX", **(ome_metadata or {})}
                tw.write(pyramid[0], subifds=len(pyramid) - 1, resolution=res, resolutionunit="CENTIMETER",
                         metadata=meta, **opts)
                for lv in pyramid[1:]:
                    f = image.shape[1] / lv.shape[1]
                    tw.write(lv, subfiletype=1, resolution=(res[0] / f, res[1] / f), resolutionunit="CENTIMETER",
                             metadata=None, **opts)
            else:
                tw.write(pyramid[0], resolution=res, resolutionunit="CENTIMETER", description=description,
                         metadata=None, **opts)
                for lv in pyramid[1:]:
                    f = image.shape[1] / lv.shape[1]
                    tw.write(lv, subfiletype=1, resolution=(res[0] / f, res[1] / f), resolutionunit="CENTIMETER",
                             metadata=None, **opts)
    return Path(path)


def label_names_metadata(names: dict[int, str], title: str) -> dict:
    """OME metadata (for ``write_pyramid_tiff(ome_metadata=...)``) naming a label mask's values: the image's
    ``Name``, a ``Description`` ("0 = tumour, 1 = stroma, 255 = not scored") that viewers show, and the same
    map as a ``MapAnnotation`` (namespace ``xtpath/label-names``) that :func:`read_label_names` reads."""
    text = ", ".join(f"{v} = {n}" for v, n in sorted(names.items()))
    return {"Name": title, "Description": f"label mask: {text}",
            "MapAnnotation": {"Namespace": LABEL_NAMESPACE, **{str(v): n for v, n in sorted(names.items())}}}


def read_label_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """The label value -> class name map stored by :func:`label_names_metadata` in an OME-TIFF (empty if none)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        xml = tf.ome_metadata
    if not xml:
        return {}
    ann = tifffile.xml2dict(xml).get("OME", {}).get("StructuredAnnotations", {}).get("MapAnnotation", [])
    for a in ann if isinstance(ann, list) else [ann]:
        if a.get("Namespace") != LABEL_NAMESPACE:
            continue
        pairs = a.get("Value", {}).get("M", [])
        pairs = pairs if isinstance(pairs, list) else [pairs]
        return {int(m["K"]): str(m["value"]) for m in pairs}
    return {}
