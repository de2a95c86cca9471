"""Layer data for napari from xtpath objects: slide pyramids, region heatmaps, region labels, masks.

World coordinates are microns (the slide's mpp): layers line up with each other and napari's scale bar.
napari puts pixel centres on integer data coordinates, so a layer whose pixels are ``S`` microns wide, drawn
over a slide whose level-0 pixels are ``s`` microns wide, is translated by ``(S - s) / 2`` to start exactly at the
slide's corner.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.score import region_colors

LayerData = tuple[Any, dict[str, Any], str]


class _LevelReader:
    """Array-like view of one pyramid level (``(H, W, 3)`` uint8) that reads only what is asked for."""

    def __init__(self, slide: Any, level: int, shape: tuple[int, int]) -> None:
        self.slide, self.level = slide, level
        self.shape = (shape[0], shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1 = ys.start or 0, min(ys.stop if ys.stop is not None else self.shape[0], self.shape[0])
        x0, x1 = xs.start or 0, min(xs.stop if xs.stop is not None else self.shape[1], self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        sx, sy = self.slide.level_scale(self.level)
        out = self.slide.read_region((x0 * sx, y0 * sy), (x1 - x0, y1 - y0), level=self.level)
        return out[:, :, key[2]] if len(key) > 2 else out


def _tile_size(slide: Any, level: int) -> tuple[int, int]:
    props = slide.properties
    w = props.get(f"openslide.level[{level}].tile-width")
    h = props.get(f"openslide.level[{level}].tile-height")
    if w and h:
        return int(h), int(w)
    try:  # tiffslide: the zarr array's chunks are the TIFF tiles
        h = slide._handle()
        chunks = h._levels[level].chunks  # type: ignore[attr-defined]
        return int(chunks[0]), int(chunks[1])
    except Exception:
        return 512, 512


def slide_pyramid(slide: Any) -> tuple[list[Any], tuple[float, float]]:
    """One lazy dask array per pyramid level, chunked on the native tiles, and the level-0 scale (µm/px).

    Levels made by integer factors are padded (with white, outside the slide) so that napari, which infers
    each level's downsample from the array shapes, places them by their exact factor.
    """
    import dask.array as da

    scales = [slide.level_scale(i) for i in range(slide.level_count)]
    integer = all(abs(sx - round(sx)) < 1e-9 and abs(sy - round(sy)) < 1e-9 for sx, sy in scales)
    W0, H0 = slide.dimensions
    if integer:
        fmax = int(max(max(s) for s in scales))
        Wp, Hp = math.ceil(W0 / fmax) * fmax, math.ceil(H0 / fmax) * fmax
    levels = []
    for i, (w, h) in enumerate(slide.level_dimensions):
        if integer:
            f = int(round(scales[i][0]))
            w, h = Wp // f, Hp // f
        arr = _LevelReader(slide, i, (h, w))
        th, tw = _tile_size(slide, i)
        levels.append(da.from_array(arr, chunks=(th, tw, 3), asarray=False, fancy=False, name=f"{slide.path}-{i}"))
    mpp = slide.mpp or (1.0, 1.0)
    return levels, (float(mpp[1]), float(mpp[0]))  # napari scale is (y, x)


def slide_layer(slide: Any) -> LayerData:
    levels, scale = slide_pyramid(slide)
    meta = {"xtpath_slide": str(slide.path), "mpp": list(slide.mpp) if slide.mpp else None,
            "level0_wh": list(slide.dimensions)}
    kwargs = {"name": slide.name, "rgb": True, "multiscale": len(levels) > 1, "contrast_limits": [0, 255],
              "scale": scale, "metadata": meta}
    if slide.mpp:
        kwargs["units"] = ("um", "um")
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def _viewer_slide_layers() -> list[Any]:
    """The xtpath slide layers open in napari's current viewer (empty without one)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except ImportError:  # pragma: no cover - only called from napari
        return []
    if viewer is None:
        return []
    return [lay for lay in viewer.layers if lay.metadata.get("xtpath_slide")]


def _viewer_slides(key: str) -> set[tuple[float, float]]:
    """``metadata[key]`` (x, y) of every xtpath slide open in napari's current viewer (empty without one)."""
    return {(float(lay.metadata[key][0]), float(lay.metadata[key][1])) for lay in _viewer_slide_layers()
            if lay.metadata.get(key)}


def viewer_slide_mpps() -> set[tuple[float, float]]:
    """The level-0 µm/px (x, y) of the xtpath slides open in napari's current viewer (empty without one)."""
    return _viewer_slides("mpp")


def viewer_slide_sizes() -> set[tuple[float, float]]:
    """The level-0 (width, height) of the xtpath slides open in napari's current viewer."""
    return _viewer_slides("level0_wh")


def _cell_transform(slide_scale: tuple[float, float], cell_um: tuple[float, float]) -> dict[str, Any]:
    return {"scale": cell_um, "translate": ((cell_um[0] - slide_scale[0]) / 2, (cell_um[1] - slide_scale[1]) / 2),
            "units": ("um", "um")}


#: Heatmap pixels per region side when the last regions overhang the slide (regions padded at the edge):
#: the overhang is cut to within 1/8 of a region, keeping a heatmap under :data:`EDGE_MAX_PIXELS` pixels.
EDGE_SUBDIVIDE = 8
EDGE_MAX_PIXELS = 16_000_000


def _edge_subdivision(rows: int, cols: int, region_size: float, slide_wh: tuple[float, float] | None) -> int:
    """Heatmap pixels per region side: 1, or more when the grid reaches past the slide's right or bottom edge."""
    if slide_wh is None or (cols * region_size <= slide_wh[0] + 0.5 and rows * region_size <= slide_wh[1] + 0.5):
        return 1
    f = EDGE_SUBDIVIDE
    while f > 1 and rows * cols * f * f > EDGE_MAX_PIXELS:
        f //= 2
    return f


def heatmap_layers(cells: np.ndarray, probs: np.ndarray, classes: list[str], region_size: float,
                   slide_mpp: tuple[float, float], *, only: list[int] | None = None,
                   slide_wh: tuple[float, float] | None = None) -> list[LayerData]:
    """Per-class heatmaps (values 0..1, NaN = transparent outside the scored regions), placed on the regions.

    ``cells`` are ``(row, col)`` on the slide's region grid; ``region_size`` in level-0 pixels. With the
    slide's level-0 ``slide_wh``, regions padded past its right or bottom edge are drawn only up to the edge
    (each region then takes :data:`EDGE_SUBDIVIDE` heatmap pixels a side).
    """
    rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    f = _edge_subdivision(rows, cols, region_size, slide_wh)
    slide_scale = (slide_mpp[1], slide_mpp[0])
    cell_um = (region_size * slide_mpp[1] / f, region_size * slide_mpp[0] / f)
    out = []
    cmaps = ["magma", "viridis", "plasma", "inferno", "cividis", "turbo"]
    for c, name in enumerate(classes):
        if only is not None and c not in only:
            continue
        heat = np.full((rows, cols), np.nan, np.float32)
        heat[cells[:, 0], cells[:, 1]] = probs[:, c]
        if f > 1 and slide_wh is not None:
            heat = np.repeat(np.repeat(heat, f, axis=0), f, axis=1)
            step = region_size / f  # level-0 pixels per heatmap pixel: NaN for those that start past the edge
            heat[int(np.ceil(slide_wh[1] / step - 1e-6)):, :] = np.nan
            heat[:, int(np.ceil(slide_wh[0] / step - 1e-6)):] = np.nan
        out.append((heat, {"name": f"P({name})", "colormap": cmaps[c % len(cmaps)], "contrast_limits": [0.0, 1.0],
                           "opacity": 0.55, "blending": "translucent", "interpolation2d": "nearest",
                           "metadata": {"xtpath_heatmap": name, "region_size": region_size,
                                        "slide_mpp": list(slide_mpp)},
                           **_cell_transform(slide_scale, cell_um)}, "image"))
    return out


def region_labels_layer(cells: np.ndarray, coords: np.ndarray, probs: np.ndarray, classes: list[str],
                        region_size: float, slide_mpp: tuple[float, float]) -> LayerData:
    """Regions as an invisible Labels layer (label i+1 = region i) whose features hold each region's scores, so
    napari's status bar shows them under the cursor."""
    import pandas as pd

    rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    lab = np.zeros((rows, cols), np.int32)
    lab[cells[:, 0], cells[:, 1]] = np.arange(1, len(cells) + 1)
    feats = {"index": np.arange(1, len(cells) + 1), "x": coords[:, 0], "y": coords[:, 1]}
    for c, name in enumerate(classes):
        feats[f"prob_{name}"] = np.round(probs[:, c].astype(float), 4)
    slide_scale = (slide_mpp[1], slide_mpp[0])
    cell_um = (region_size * slide_mpp[1], region_size * slide_mpp[0])
    from napari.utils.colormaps import DirectLabelColormap

    clear = DirectLabelColormap(color_dict={None: (1.0, 1.0, 1.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)})
    return (lab, {"name": "region scores", "features": pd.DataFrame(feats), "colormap": clear,
                  "metadata": {"xtpath_regions": True, "classes": classes, "region_size": region_size,
                               "slide_mpp": list(slide_mpp)},
                  **_cell_transform(slide_scale, cell_um)}, "labels")


def class_colormap(classes: list[str]) -> Any:
    """Fixed class colours for Labels layers (0 and 255 transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[Any, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 255: (0, 0, 0, 0)}
    for c, rgb in enumerate(region_colors(len(classes))):
        if c:
            colors[c] = (*[v / 255 for v in rgb], 1.0)
    return DirectLabelColormap(color_dict=colors)


def mask_layer(mask_path: Path, classes: list[str], slide_mpp: tuple[float, float] | None) -> LayerData:
    """A segmentation mask (pyramidal OME-TIFF written by xtpath score) as a Labels layer with class colours.

    ``slide_mpp``: the slide's level-0 µm/px, for the half-pixel offset of napari's pixel centres (``None``
    when unknown: the mask's corner then lands within half a slide pixel of the slide's)."""
    import tifffile

    with tifffile.TiffFile(mask_path) as tf:
        series = tf.series[0]
        data = [np.asarray(level.asarray()) for level in series.levels]
        rx, ry = tf.pages[0].tags["XResolution"].value, tf.pages[0].tags["YResolution"].value
    scale = (1e4 * ry[1] / ry[0], 1e4 * rx[1] / rx[0])  # (y, x) µm per mask pixel
    slide_scale = (slide_mpp[1], slide_mpp[0]) if slide_mpp else (0.0, 0.0)
    meta: dict[str, Any] = {"xtpath_mask": str(mask_path), "classes": classes}
    if slide_mpp:
        meta["slide_mpp"] = list(slide_mpp)
    return (data if len(data) > 1 else data[0],
            {"name": "segmentation", "colormap": class_colormap(classes), "opacity": 0.5,
             "multiscale": len(data) > 1, "metadata": meta, **_cell_transform(slide_scale, scale)}, "labels")


def mask_file_layers(mask_path: Path, slide_mpp: tuple[float, float] | None) -> list[LayerData]:
    """A label mask written by ``xtpath score`` opened on its own: class names from its OME metadata, the
    slide's mpp from the ``prediction.json`` beside it (else ``slide_mpp``, the slide open in the viewer)."""
    from xtpath.io.tiffwriter import read_label_names

    names = read_label_names(mask_path)
    top = max([v for v in names if v != 255], default=0)
    classes = [names.get(v, f"class {v}") for v in range(top + 1)]
    rec_path = mask_path.parent / "prediction.json"
    if rec_path.exists():
        rec = json.loads(rec_path.read_text())
        if rec.get("slide_mpp"):
            slide_mpp = (float(rec["slide_mpp"][0]), float(rec["slide_mpp"][1]))
    data, kwargs, kind = mask_layer(mask_path, classes, slide_mpp)
    kwargs["name"] = f"{mask_path.parent.name} segmentation" if rec_path.exists() else mask_path.name.split(".")[0]
    return [(data, kwargs, kind)]


def annotation_layers(path: Path, slide_mpp: tuple[float, float] | None) -> list[LayerData]:
    """A QuPath GeoJSON (level-0 pixels) as layers in microns over the slide (``slide_mpp``; world = pixels when
    no slide is known): polygons (one per exterior ring; napari shapes have no holes) and lines as one Shapes
    layer, points as a Points layer, each with its class as the ``class`` feature."""
    from xtpath.io.geojson import read_features

    mpp = slide_mpp or (1.0, 1.0)

    def world(xy: Any) -> np.ndarray:
        # level-0 continuous (x, y) -> world (y, x) in µm: pixel i's centre (i + 0.5) sits at i * mpp
        a = np.asarray(xy, float).reshape(-1, 2)
        return np.stack([(a[:, 1] - 0.5) * mpp[1], (a[:, 0] - 0.5) * mpp[0]], axis=1)

    shapes, kinds, shape_classes, points, point_classes = [], [], [], [], []
    for name, kind, coords in read_features(path):
        if kind == "point":
            points.append(world(coords)[0])
            point_classes.append(name)
            continue
        ring = np.asarray(coords[0] if kind == "polygon" else coords, float)
        if kind == "polygon" and len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) < (3 if kind == "polygon" else 2):
            continue
        shapes.append(world(ring))
        kinds.append("polygon" if kind == "polygon" else "path")
        shape_classes.append(name)
    meta: dict[str, Any] = {"xtpath_annotations": str(path)}
    if slide_mpp:
        meta["slide_mpp"] = list(slide_mpp)
    units = {"units": ("um", "um")} if slide_mpp else {}
    name = path.name.split(".")[0]
    layers: list[LayerData] = []
    if shapes or not points:
        layers.append((shapes, {"name": name, "shape_type": kinds, "edge_width": 2 * mpp[0],
                                "face_color": "transparent", "edge_color": "yellow",
                                "features": {"class": shape_classes}, "metadata": dict(meta), **units}, "shapes"))
    if points:
        layers.append((np.asarray(points), {"name": f"{name} points" if shapes else name, "size": 10 * mpp[0],
                                            "face_color": "yellow", "features": {"class": point_classes},
                                            "metadata": dict(meta), **units}, "points"))
    return layers


def tissue_layer(mask_png: Path, slide: Any) -> LayerData:
    """A tissue mask PNG (``xtpath tissue``) as a Labels layer."""
    from PIL import Image

    m = (np.asarray(Image.open(mask_png)) > 0).astype(np.uint8)
    W0, H0 = slide.dimensions
    mpp = slide.mpp or (1.0, 1.0)
    cell = (H0 / m.shape[0] * mpp[1], W0 / m.shape[1] * mpp[0])
    return (m, {"name": "tissue", "opacity": 0.3, "colormap": class_colormap(["background", "tissue"]),
                **_cell_transform((mpp[1], mpp[0]), cell)}, "labels")


def score_folder_layers(folder: Path) -> list[LayerData]:
    """The slide, per-class heatmaps, region scores and (segmentation) the mask of an ``xtpath score`` folder."""
    import h5py

    from xtpath.cache import derive_grid
    from xtpath.io import open_slide

    rec = json.loads((folder / "prediction.json").read_text())
    if rec.get("status") != "ok":
        raise ValueError(f"{folder}: the slide failed to score ({rec.get('message')})")
    slide_path = Path(rec["slide_path"])
    if not slide_path.is_absolute():  # a relative path is relative to the score folder (bundled samples)
        slide_path = (folder / slide_path).resolve()
    moved = not slide_path.exists()
    if moved:  # draw the results over the same slide open from its new place (same bytes: same fingerprint)
        slide_path = _open_slide_with(rec.get("slide_fingerprint")) or slide_path
        if not slide_path.exists():
            from xtpath.errors import XtpathError

            raise XtpathError(f"{folder}: its slide {rec['slide_path']} is not there (moved, renamed or on another "
                              "machine); open the slide from where it is now, then this folder again: the results "
                              "are drawn over an open slide with the same content")
    slide = open_slide(slide_path, mpp=tuple(rec["slide_mpp"]))
    mpp = tuple(rec["slide_mpp"])
    layers = [slide_layer(slide)]
    with h5py.File(folder / "regions.h5", "r") as f:
        coords, probs = f["coords"][:], f["probs"][:]
    size = float(rec["region_size_level0"])
    # the cell nearest each region's level-0 corner, as score draws its heatmap and mask (not the stored grid,
    # which older score folders of CLAM/TRIDENT caches number from their first region)
    cells = derive_grid(coords, size)
    classes = list(rec["classes"])
    if (folder / "mask.ome.tif").exists():
        layers.append(mask_layer(folder / "mask.ome.tif", classes, mpp))
    else:
        target = [1] if len(classes) == 2 else list(range(len(classes)))
        layers += heatmap_layers(cells, probs, classes, size, mpp, only=target, slide_wh=slide.dimensions)
    layers.append(region_labels_layer(cells, coords, probs, classes, size, mpp))
    layers[0][1]["metadata"]["xtpath_prediction"] = rec
    for _, kwargs, _ in layers[1:]:  # exports of these layers stop at the slide's border
        kwargs["metadata"]["slide_wh"] = list(slide.dimensions)
    return layers[1:] if moved else layers  # a moved slide is open already: only its results are added


def _open_slide_with(fingerprint: str | None) -> Path | None:
    """The file of an xtpath slide open in napari's current viewer whose bytes have ``fingerprint`` (see
    :func:`xtpath.io.files.file_fingerprint`), or ``None``."""
    if not fingerprint:
        return None
    from xtpath.io.files import file_fingerprint

    for path in (Path(lay.metadata["xtpath_slide"]) for lay in _viewer_slide_layers()):
        try:
            if path.exists() and file_fingerprint(path) == fingerprint:
                return path
        except OSError:
            continue
    return None
