"""QuPath-compatible GeoJSON: masks to polygons in level-0 pixels, features, atomic writing.

QuPath imports a ``FeatureCollection`` whose features carry ``properties.objectType`` (``"annotation"``,
``"detection"``, ``"tile"``), an optional ``classification`` ``{"name", "color": [r, g, b]}`` and optional
``measurements``. Coordinates are level-0 pixels, rings are closed (first point repeated at the end).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.io.files import atomic_path

__all__ = ["mask_polygons", "polygon_feature", "geometry_feature", "box_feature", "tile_features", "feature_collection",
           "write_geojson", "read_features", "read_annotations"]

Ring = list[list[float]]


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _exact_polygons(mask: np.ndarray, scale_xy: tuple[float, float],
                    offset_xy: tuple[float, float]) -> list[list[Ring]]:
    """Polygons along the pixel edges (no corner cutting): the union of each row's runs of pixels (shapely)."""
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(padded, axis=1)
    rows_s, cols_s = np.nonzero(d == 1)
    _, cols_e = np.nonzero(d == -1)
    boxes = [box(c0, r, c1, r + 1) for r, c0, c1 in zip(rows_s, cols_s, cols_e)]
    if not boxes:
        return []
    geom = unary_union(boxes)
    polys = [geom] if isinstance(geom, Polygon) else list(getattr(geom, "geoms", []))
    sx, sy = scale_xy
    ox, oy = offset_xy
    out: list[list[Ring]] = []
    for poly in sorted(polys, key=lambda p: -p.area):
        poly = poly.simplify(0)  # drop the vertices of collinear pixel edges
        rings = [poly.exterior, *poly.interiors]
        out.append([[[round(x * sx + ox, 2), round(y * sy + oy, 2)] for x, y in ring.coords] for ring in rings])
    return out


def mask_polygons(mask: np.ndarray, scale_xy: tuple[float, float] = (1.0, 1.0),
                  offset_xy: tuple[float, float] = (0.0, 0.0), *, tolerance: float = 0.5,
                  exact: bool = False, clip_xy: tuple[float, float] | None = None) -> list[list[Ring]]:
    """Polygons (exterior ring, then holes) outlining the ``True`` areas of a mask.

    Parameters
    ----------
    mask : (H, W) bool array
        Mask pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)`` in mask pixels.
    scale_xy : (float, float)
        Output units per mask pixel (e.g. level-0 pixels per mask pixel).
    offset_xy : (float, float)
        Output position of the mask's top-left corner.
    tolerance : float
        Douglas-Peucker tolerance in mask pixels (0 keeps every vertex).

    exact : bool
        Follow the pixel edges exactly (label and segmentation masks, where a pixel can be a whole region);
        otherwise smooth marching-squares outlines (tissue), simplified with ``tolerance``.
    clip_xy : (float, float), optional
        Keep every vertex inside ``[0, W] x [0, H]`` (the slide: a mask's last pixels may reach past its edge).

    Returns
    -------
    list of polygons; each polygon is a list of closed rings ``[[x, y], ...]``, exterior first.
    Foreground is 4-connected and holes are 8-connected, as marching squares draws them.
    """
    mask = np.asarray(mask, dtype=bool)
    polygons = _exact_polygons(mask, scale_xy, offset_xy) if exact else \
        _smooth_polygons(mask, scale_xy, offset_xy, tolerance)
    if clip_xy is not None:
        w, h = clip_xy
        polygons = [[[[min(max(x, 0.0), w), min(max(y, 0.0), h)] for x, y in ring] for ring in poly]
                    for poly in polygons]
    return polygons


def _smooth_polygons(mask: np.ndarray, scale_xy: tuple[float, float], offset_xy: tuple[float, float],
                     tolerance: float) -> list[list[Ring]]:
    from skimage.measure import approximate_polygon, find_contours, label, regionprops

    polygons: list[list[Ring]] = []
    labels = label(mask, connectivity=1)
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        comp = np.pad(labels[r0:r1, c0:c1] == region.label, 1).astype(np.float32)
        rings = []
        for contour in find_contours(comp, 0.5):
            if tolerance > 0:
                contour = approximate_polygon(contour, tolerance)
            if len(contour) < 4:
                continue
            # contour (row, col) in padded pixel-centre coordinates -> pixel-edge coordinates of the mask
            xy = np.stack([contour[:, 1] - 1 + 0.5 + c0, contour[:, 0] - 1 + 0.5 + r0], axis=1)
            xy = xy * np.asarray(scale_xy, dtype=np.float64) + np.asarray(offset_xy, dtype=np.float64)
            if not np.allclose(xy[0], xy[-1]):
                xy = np.vstack([xy, xy[:1]])
            rings.append(xy)
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_ring_area(r)))
        polygons.append([np.round(r, 2).tolist() for r in rings])
    return polygons


def polygon_feature(polygon: Sequence[Ring] | Sequence[Sequence[Ring]], *, object_type: str = "annotation",
                    name: str | None = None, color: tuple[int, int, int] | None = None,
                    measurements: dict[str, float] | None = None, extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """One GeoJSON Feature; ``polygon`` is one polygon (list of rings) or several (a MultiPolygon)."""
    multi = bool(polygon) and isinstance(polygon[0][0][0], (list, tuple))
    return geometry_feature({"type": "MultiPolygon" if multi else "Polygon", "coordinates": polygon},
                            object_type=object_type, name=name, color=color, measurements=measurements, extra=extra)


def geometry_feature(geometry: dict[str, Any], *, object_type: str = "annotation", name: str | None = None,
                     color: tuple[int, int, int] | None = None, measurements: dict[str, float] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One GeoJSON Feature of any geometry (``{"type": "LineString", "coordinates": ...}``...) with QuPath's
    properties: ``objectType``, a ``classification`` when ``name`` is given, ``measurements``."""
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": list(color) if color else [255, 0, 0]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    if extra:
        props.update(extra)
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props}


def box_feature(x: float, y: float, w: float, h: float, **kw: Any) -> dict[str, Any]:
    """A rectangle ``[x, x+w) x [y, y+h)`` in level-0 pixels as a Feature (e.g. a scored region as a tile)."""
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return polygon_feature([ring], **kw)


def tile_features(xy: np.ndarray, size: float, probs: np.ndarray, classes: Sequence[str],
                  colors: Sequence[tuple[int, int, int]], *,
                  clip_xy: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """Square regions as QuPath ``tile`` objects with a ``prob_<class>`` measurement each (as WSInfer writes),
    classified by their most probable class; built in bulk (10 000 tiles in ~0.05 s).

    Parameters
    ----------
    xy : (N, 2) level-0 top-left corners; size : side in level-0 pixels; probs : (N, C).
    clip_xy : (W, H), optional
        The slide's level-0 size: edge regions (padded past the slide) are cut at its border.
    """
    xy = np.asarray(xy, dtype=np.float64)
    far = xy + size
    if clip_xy is not None:
        far = np.minimum(far, np.asarray(clip_xy, dtype=np.float64))
    names = [f"prob_{c}" for c in classes]
    classification = [{"name": c, "color": list(col)} for c, col in zip(classes, colors)]
    # 10k+ small lists and dicts: the cyclic collector would double the time (and make the (N, C) tolist
    # 10x slower when other objects are alive) and find nothing
    with _gc_paused():
        x0, y0 = xy[:, 0].round(2).tolist(), xy[:, 1].round(2).tolist()
        x1, y1 = far[:, 0].round(2).tolist(), far[:, 1].round(2).tolist()
        best = np.asarray(probs).argmax(1).tolist()
        values = np.asarray(probs, dtype=np.float64).round(6).tolist()
        return [{"type": "Feature", "id": uid,
                 "geometry": {"type": "Polygon",
                              "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]},
                 "properties": {"objectType": "tile", "isLocked": True, "classification": classification[k],
                                "measurements": dict(zip(names, v))}}
                for a, b, c, d, k, v, uid in zip(x0, y0, x1, y1, best, values, uuid4_strings(len(x0)))]


@contextmanager
def _gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def uuid4_strings(n: int) -> list[str]:
    """``n`` random (version 4) UUIDs as strings, like ``str(uuid.uuid4())`` but 10x faster in bulk."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexes = raw.tobytes().hex()
    rows = (hexes[i:i + 32] for i in range(0, 32 * n, 32))
    return [f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" for h in rows]


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike[str], features: list[dict[str, Any]]) -> None:
    """Write a FeatureCollection atomically, compact, with orjson (10 000 tiles: 0.015 s instead of
    ``json.dumps``' 0.08-0.1 s). Numpy numbers and arrays are written as JSON numbers and lists."""
    import orjson

    data = orjson.dumps(feature_collection(features),
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_features(path: str | os.PathLike[str]) -> list[tuple[str, str, Any]]:
    """Every geometry of a QuPath GeoJSON export as ``(class name, kind, coordinates)`` in level-0 pixels:
    ``kind`` ``"polygon"`` (``[exterior, hole, ...]``), ``"line"`` (a list of points) or ``"point"``
    (``[x, y]``); Multi* geometries are split into their parts, other geometry types are skipped.

    Accepts a FeatureCollection, a list of features (QuPath's "export as array") or one feature; the class is
    ``properties.classification.name`` (``"annotation"`` when missing).

    Raises
    ------
    ManifestError
        The file is not valid JSON/GeoJSON.
    """
    import json

    from xtpath.errors import ManifestError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not a readable GeoJSON file ({e}); export annotations from QuPath as "
                            "GeoJSON") from e
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features", [])
    elif isinstance(data, list):
        feats = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    else:
        raise ManifestError(f"{path}: expected a GeoJSON FeatureCollection, feature list or Feature")
    single = {"Polygon": "polygon", "LineString": "line", "Point": "point"}
    multi = {"MultiPolygon": "polygon", "MultiLineString": "line", "MultiPoint": "point"}
    out: list[tuple[str, str, Any]] = []
    for f in feats:
        f = f if isinstance(f, dict) else {}
        geom = f.get("geometry") or {}
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else None
        name = str(name) if name else "annotation"
        kind = geom.get("type")
        if kind in single:
            out.append((name, single[kind], geom["coordinates"]))
        elif kind in multi:
            out.extend((name, multi[kind], part) for part in geom["coordinates"])
    return out


def read_annotations(path: str | os.PathLike[str]) -> list[tuple[str, list[Ring]]]:
    """Polygons of a QuPath GeoJSON export as ``(class name, [exterior, hole, ...])`` in level-0 pixels
    (Polygon and MultiPolygon geometries of :func:`read_features`; lines and points have no area).

    Raises
    ------
    ManifestError
        The file is not valid JSON/GeoJSON.
    """
    return [(name, coords) for name, kind, coords in read_features(path) if kind == "polygon"]
