"""npe2 reader: whole-slide images (any format xtpath reads) and xtpath score folders.

Returns ``None`` for paths it cannot read, so napari can try other readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from napari_xt._layers import LayerData, score_folder_layers, slide_layer


def _is_score_folder(p: Path) -> bool:
    return p.is_dir() and (p / "prediction.json").exists() and (p / "regions.h5").exists()


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """The reader function for ``path``, or ``None`` if it is neither a slide nor a score folder."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if _is_score_folder(p):
        return read_score_folder
    try:
        from xtpath.io import open_slide

        open_slide(p).close()
    except Exception:
        return None
    return read_slide


def read_slide(path: str | list[str]) -> list[LayerData]:
    from xtpath.io import open_slide

    p = path[0] if isinstance(path, list) else path
    return [slide_layer(open_slide(p))]


def read_score_folder(path: str | list[str]) -> list[LayerData]:
    p = Path(path[0] if isinstance(path, list) else path)
    return score_folder_layers(p)
