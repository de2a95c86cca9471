"""Slide readers (openslide and tiffslide behind one :class:`Slide`) and slide metadata."""

from xtpath.io.metadata import MppInfo
from xtpath.io.slide import Slide, open_slide, slide_name

__all__ = ["MppInfo", "Slide", "open_slide", "slide_name"]
