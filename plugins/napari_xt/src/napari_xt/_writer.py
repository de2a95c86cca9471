"""npe2 writer: Shapes, Points and Labels layers (and region scores) to QuPath GeoJSON in level-0 pixels.

napari puts the centre of a slide's level-0 pixel ``i`` at world ``i * mpp`` (microns), so world ``w`` is level-0
position ``w / mpp + 0.5`` in the continuous coordinates where pixel ``i`` covers ``[i, i + 1)``, which is what
QuPath uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_xt._layers import viewer_slide_mpps, viewer_slide_sizes
from xtpath.errors import XtpathError
from xtpath.io.geojson import box_feature, geometry_feature, mask_polygons, polygon_feature
from xtpath.io.geojson import write_geojson as _write_feature_collection
from xtpath.score import region_colors


def _viewer_slide_mpp() -> tuple[float, float] | None:
    """The mpp of the xtpath slides open in napari's current viewer when they all share one, else ``None``."""
    mpps = viewer_slide_mpps()
    if len(mpps) > 1:  # not a ValueError: napari reads that as "no writer" and drops the message
        raise XtpathError("slides with different microns per pixel are open, so a layer drawn over them has no "
                         "single level-0 pixel size; close the other slides, or set the layer's "
                         "metadata['slide_mpp'] = [x, y] before saving")
    return next(iter(mpps)) if mpps else None


def _mpp(meta: dict[str, Any]) -> tuple[float, float]:
    """Microns per level-0 pixel (x, y) of the slide a layer belongs to: the layer's own metadata (layers the
    plugin made), else the slide open in the viewer (layers the user drew), else 1 (world = pixels)."""
    md = meta.get("metadata") or {}
    for key in ("slide_mpp", "mpp"):
        if md.get(key):
            return float(md[key][0]), float(md[key][1])
    return _viewer_slide_mpp() or (1.0, 1.0)


def _slide_wh(meta: dict[str, Any]) -> tuple[float, float] | None:
    """Level-0 (width, height) of the layer's slide, to cut exports at its border: the layer's metadata, else
    the one slide open in the viewer, else unknown (not cut)."""
    md = meta.get("metadata") or {}
    if md.get("slide_wh"):
        return float(md["slide_wh"][0]), float(md["slide_wh"][1])
    sizes = viewer_slide_sizes()
    return next(iter(sizes)) if len(sizes) == 1 else None


def _affine(meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), float)[-2:]
    return scale, translate


#: Vertices of the polygon an ellipse is exported as (QuPath has no ellipse in GeoJSON).
ELLIPSE_VERTICES = 72


def _shape_geometry(xy: np.ndarray, shape_type: str) -> Any:
    """A napari shape's vertices (level-0 ``(x, y)``) as a shapely geometry: ellipses as polygons through
    :data:`ELLIPSE_VERTICES` points (napari gives the four corners of their bounding box), lines and paths as
    line strings, rectangles and polygons as polygons."""
    from shapely.geometry import LineString, Polygon

    if shape_type in ("line", "path"):
        return LineString(xy)
    if shape_type == "ellipse":
        centre = xy.mean(axis=0)
        u, v = (xy[1] - xy[0]) / 2, (xy[3] - xy[0]) / 2  # half axes along the box's two sides (it may be rotated)
        t = np.linspace(0, 2 * np.pi, ELLIPSE_VERTICES, endpoint=False)[:, None]
        xy = centre + np.cos(t) * u + np.sin(t) * v
    poly = Polygon(xy)
    return poly if poly.is_valid else poly.buffer(0)  # a self-crossing polygon: its covered area


def _geometry_features(geom: Any, cls: str) -> list[dict[str, Any]]:
    """GeoJSON features (level-0 pixels, 2 decimals) of a clipped shapely geometry: its polygons as one
    annotation, its lines as another."""
    polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and not g.is_empty]
    lines = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "LineString" and not g.is_empty]
    out = []
    if polys:
        rings = [[np.round(np.asarray(r.coords), 2).tolist() for r in (p.exterior, *p.interiors)] for p in polys]
        out.append(polygon_feature(rings[0] if len(rings) == 1 else rings, object_type="annotation", name=cls,
                                   color=(255, 200, 0)))
    for line in lines:
        coords = np.round(np.asarray(line.coords), 2).tolist()
        out.append(geometry_feature({"type": "LineString", "coordinates": coords}, object_type="annotation",
                                    name=cls, color=(255, 200, 0)))
    return out


def _shape_features(data: list[np.ndarray], meta: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Shapes in level-0 pixels, cut at the slide's border (the part of each shape inside the slide; a shape
    wholly outside it is left out)."""
    from shapely.geometry import box

    mpp, bounds = _mpp(meta), _slide_wh(meta)
    scale, translate = _affine(meta)
    table = meta.get("features")
    classes = list(table["class"]) if table is not None and len(table) and "class" in table else None
    types = meta.get("shape_type") or ["polygon"] * len(data)
    slide = box(0.0, 0.0, bounds[0], bounds[1]) if bounds is not None else None
    feats = []
    for i, verts in enumerate(data):
        world = np.asarray(verts, dtype=float)[:, -2:] * scale + translate  # (y, x) in µm
        xy = np.stack([world[:, 1] / mpp[0] + 0.5, world[:, 0] / mpp[1] + 0.5], axis=1)
        geom = _shape_geometry(xy, str(types[i]))
        if slide is not None:
            geom = geom.intersection(slide)
        cls = str(classes[i]) if classes else name
        feats += _geometry_features(geom, cls)
    return feats


def _point_features(data: Any, meta: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Points in level-0 pixels, one Point feature each (points outside the slide are left out)."""
    mpp, bounds = _mpp(meta), _slide_wh(meta)
    scale, translate = _affine(meta)
    table = meta.get("features")
    classes = list(table["class"]) if table is not None and len(table) and "class" in table else None
    pts = np.asarray(data, dtype=float)
    if pts.size == 0:
        return []
    world = pts[:, -2:] * scale + translate  # (y, x) in µm
    feats = []
    for i, (wy, wx) in enumerate(world):
        x, y = wx / mpp[0] + 0.5, wy / mpp[1] + 0.5
        if bounds is not None and not (0 <= x <= bounds[0] and 0 <= y <= bounds[1]):
            continue
        feats.append(geometry_feature({"type": "Point", "coordinates": [round(x, 2), round(y, 2)]},
                                      object_type="annotation", name=str(classes[i]) if classes else name,
                                      color=(255, 200, 0)))
    return feats


def _labels_features(data: Any, meta: dict[str, Any], name: str) -> list[dict[str, Any]]:
    md = meta.get("metadata") or {}
    if md.get("xtpath_regions"):
        # region scores: one QuPath tile per region with a measurement per class (as WSInfer writes them)
        table, classes = meta["features"], list(md["classes"])
        colors, size = region_colors(len(classes)), float(md["region_size"])
        W, H = _slide_wh(meta) or (np.inf, np.inf)
        out = []
        for _, r in table.iterrows():
            probs = [float(r[f"prob_{c}"]) for c in classes]
            c = int(np.argmax(probs))
            x, y = float(r["x"]), float(r["y"])
            out.append(box_feature(x, y, min(size, W - x), min(size, H - y), object_type="tile", name=classes[c],
                                   color=colors[c], measurements={f"prob_{n}": p for n, p in zip(classes, probs)}))
        return out
    # level 0 of a multiscale layer (napari's MultiScaleData is a sequence, not a list; asarray of it would
    # give the coarsest level)
    arr = np.asarray(data[0] if meta.get("multiscale") or isinstance(data, (list, tuple)) else data)
    mpp = _mpp(meta)
    scale, translate = _affine(meta)
    per_px = (scale[1] / mpp[0], scale[0] / mpp[1])  # level-0 pixels per label pixel (x, y)
    corner = ((translate[1] - scale[1] / 2) / mpp[0] + 0.5, (translate[0] - scale[0] / 2) / mpp[1] + 0.5)
    classes = md.get("classes")
    values = [int(v) for v in np.unique(arr) if v not in (0, 255)]
    colors = region_colors(max([*values, len(classes or []) - 1, 0]) + 1)
    out = []
    for value in values:
        cls = classes[value] if classes and value < len(classes) else f"{name} {value}"
        for poly in mask_polygons(arr == value, per_px, corner, exact=True, clip_xy=_slide_wh(meta)):
            out.append(polygon_feature(poly, object_type="annotation", name=cls, color=colors[value]))
    return out


def write_geojson(path: str, layer_data: list[tuple[Any, dict[str, Any], str]]) -> list[str]:
    """Write the given Shapes, Points and Labels layers into one QuPath GeoJSON FeatureCollection."""
    feats: list[dict[str, Any]] = []
    for data, meta, kind in layer_data:
        name = meta.get("name", kind)
        if kind == "shapes":
            feats += _shape_features(data, meta, name)
        elif kind == "labels":
            feats += _labels_features(data, meta, name)
        elif kind == "points":
            feats += _point_features(data, meta, name)
    _write_feature_collection(path, feats)
    return [path]
