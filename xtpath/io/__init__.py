"""Slide readers (openslide and tiffslide behind one :class:`Slide`), slide metadata and the slides CSV."""

from xtpath.io.manifest import SlideRow, read_slides_csv
from xtpath.io.metadata import MppInfo
from xtpath.io.slide import Slide, open_slide, slide_name

__all__ = ["MppInfo", "Slide", "SlideRow", "open_slide", "read_slides_csv", "slide_name"]
