"""xtpath: xT nested tokenization and long-context models for whole-slide pathology images.

Importing :mod:`xtpath` is cheap: the public names below are loaded on first use, so the command line's
``--help`` and a plugin's start-up never import torch, openslide or scikit-image.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "XtpathError": "xtpath.errors",
    "open_slide": "xtpath.io",
    "Slide": "xtpath.io",
    "detect_tissue": "xtpath.tissue",
    "TissueMask": "xtpath.tissue",
    "TissueParams": "xtpath.tissue",
    "make_region_grid": "xtpath.tiling",
    "RegionGrid": "xtpath.tiling",
    "subregion_boxes": "xtpath.tiling",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from xtpath.errors import XtpathError  # noqa: F401
    from xtpath.io import Slide, open_slide  # noqa: F401
    from xtpath.tiling import RegionGrid, make_region_grid, subregion_boxes  # noqa: F401
    from xtpath.tissue import TissueMask, TissueParams, detect_tissue  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xtpath' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
