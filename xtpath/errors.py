"""The one error family of xtpath.

Every error a user can cause (a missing file, a slide without a resolution, a bad CSV row, a cache made with
other settings) is an :class:`XtpathError` whose message is one line that names the file, row or parameter and
says how to fix it. The command line prints that line and exits non-zero; library users catch one class.
"""

from __future__ import annotations

__all__ = [
    "XtpathError",
    "SlideNotFoundError",
    "UnsupportedSlideError",
    "CorruptRegionError",
    "MissingMppError",
    "InvalidParameterError",
    "ManifestError",
    "CacheError",
    "CheckpointError",
]


class XtpathError(Exception):
    """Base class of every error xtpath raises on purpose."""


class SlideNotFoundError(XtpathError, FileNotFoundError):
    """The slide path does not exist."""


class UnsupportedSlideError(XtpathError):
    """No backend can open the file as a slide."""


class CorruptRegionError(XtpathError):
    """A region of the slide could not be decoded (a corrupt tile)."""

    def __init__(self, message: str, *, path: str = "", location_xy: tuple[float, float] = (0, 0),
                 size_wh: tuple[int, int] = (0, 0), level: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.location_xy = location_xy
        self.size_wh = size_wh
        self.level = level


class MissingMppError(XtpathError):
    """The slide has no usable microns-per-pixel and none was given."""


class InvalidParameterError(XtpathError, ValueError):
    """A parameter has a value that cannot work; the message names it."""


class ManifestError(XtpathError):
    """A slides CSV has one or more bad rows; the message lists each as ``file:LINE: problem``."""


class CacheError(XtpathError):
    """A feature cache is missing, unreadable, or was made with other settings."""


class CheckpointError(XtpathError):
    """A model checkpoint is missing, unreadable, or does not match the expected configuration."""
