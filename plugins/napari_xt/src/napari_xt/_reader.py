"""npe2 reader: whole-slide images (any format xtpath reads), xtpath score folders, the label masks that
``xtpath score`` writes (``mask.ome.tif``, as a Labels layer with class names) and QuPath GeoJSON (as Shapes over
the slide open in the viewer).

Returns ``None`` for paths it cannot read, so napari can try other readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from napari_xt._layers import (LayerData, annotation_layers, mask_file_layers, score_folder_layers, slide_layer,
                               viewer_slide_mpps)


def _is_score_folder(p: Path) -> bool:
    return p.is_dir() and (p / "prediction.json").exists() and (p / "regions.h5").exists()


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader function for ``path``, or ``None`` if it is none of: a slide, a score folder, a label mask
    written by xtpath score, a QuPath GeoJSON."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if _is_score_folder(p):
        return read_score_folder
    wrong = _near_miss(p)
    if wrong is not None:  # an xtpath output that is not one slide's results: say what to open instead
        return _refuse(wrong)
    name = p.name.lower()
    if p.is_file() and name.endswith((".geojson", ".json")):
        return read_geojson if _reads(p, _annotations) else None
    if p.is_file() and name.endswith((".ome.tif", ".ome.tiff")) and _reads(p, _label_names):
        return read_label_mask
    return read_slide if _reads(p, _slide) else None


def _near_miss(p: Path) -> str | None:
    """Why ``p``, an xtpath output, is not something to open (and what to open), or ``None``."""
    if p.is_dir() and (p / "predictions.csv").is_file():
        slides = sorted(d.name for d in p.iterdir() if _is_score_folder(d))
        example = f", e.g. {p / slides[0]}" if slides else ""
        return (f"{p}: the score folder of {len(slides)} slide(s); open one slide's folder{example} (its heatmap, "
                "region scores and mask over the slide)")
    if p.is_dir() and (p / "classes.json").is_file() and any(p.glob("*.safetensors")):
        return f"{p}: a trained model's run folder; open a slide, then choose this folder in Plugins > Run xtpath model"
    if p.is_file() and p.name == "prediction.json" and _is_score_folder(p.parent):
        return f"{p}: open the slide's folder {p.parent} (the slide with its results)"
    folder = p if p.is_dir() else p.parent if p.name == "prediction.json" else None
    if folder is not None and (folder / "prediction.json").is_file() and not _is_score_folder(folder):
        return _failed_slide(folder)
    return None


def _failed_slide(folder: Path) -> str | None:
    """The message of a slide that xtpath score failed on (its folder holds only ``prediction.json``)."""
    import json

    try:
        rec = json.loads((folder / "prediction.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("status") != "failed":
        return None
    return (f"{folder}: xtpath score failed on slide {rec.get('slide_id', folder.name)!r}, so there are no results "
            f"to show: {rec.get('message') or rec.get('error') or 'no reason recorded'}")


def _refuse(message: str) -> Callable[[Any], list[LayerData]]:
    def read(path: str | list[str]) -> list[LayerData]:
        from xtpath.errors import XtpathError

        raise XtpathError(message)

    return read


def _reads(p: Path, probe: Callable[[Path], Any]) -> bool:
    """Whether ``probe(p)`` finds something to show (any error: not ours, napari tries other readers)."""
    try:
        return bool(probe(p))
    except Exception:
        return False


def _annotations(p: Path) -> Any:
    from xtpath.io.geojson import read_features

    return read_features(p)


def _label_names(p: Path) -> Any:
    from xtpath.io.tiffwriter import read_label_names

    return read_label_names(p)


def _slide(p: Path) -> bool:
    from xtpath.io import open_slide

    open_slide(p).close()
    return True


def read_slide(path: str | list[str]) -> list[LayerData]:
    from xtpath.io import open_slide

    p = path[0] if isinstance(path, list) else path
    return [slide_layer(open_slide(p))]


def read_score_folder(path: str | list[str]) -> list[LayerData]:
    p = Path(path[0] if isinstance(path, list) else path)
    return score_folder_layers(p)


def _one_slide_mpp(path: Path) -> tuple[float, float] | None:
    """The µm/px of the slides open (None without one: level-0 pixels); slides of several resolutions leave no
    way to tell which one the file belongs to, and guessing would draw it at the wrong size."""
    mpps = viewer_slide_mpps()
    if len(mpps) > 1:
        from xtpath.errors import XtpathError

        shown = ", ".join(f"{m[0]:.4g}" for m in sorted(mpps))
        raise XtpathError(f"{path}: slides of {len(mpps)} resolutions are open ({shown} µm/px) and this file is "
                          "in one slide's level-0 pixels; open it with only its slide (or slides of one "
                          "resolution) in the viewer")
    return next(iter(mpps)) if mpps else None


def read_label_mask(path: str | list[str]) -> list[LayerData]:
    p = Path(path[0] if isinstance(path, list) else path)
    return mask_file_layers(p, _one_slide_mpp(p))


def read_geojson(path: str | list[str]) -> list[LayerData]:
    p = Path(path[0] if isinstance(path, list) else path)
    return annotation_layers(p, _one_slide_mpp(p))
