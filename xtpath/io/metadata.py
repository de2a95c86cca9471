"""Resolution (microns per pixel) and objective power from slide metadata, with where each came from."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

__all__ = ["MppInfo", "resolve_mpp", "objective_power", "ome_physical_size"]

# Writers that know no resolution store a screen default. A level-0 pixel of 254 or 353 microns is not a
# microscope slide: treat these as "unknown" so that no one tiles a slide at a made-up scale.
_PLACEHOLDER_DPI = (72.0, 96.0)

_UNIT_TO_UM = {
    "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6,
    "pm": 1e-6, "Å": 1e-4,
}


@dataclass(frozen=True)
class MppInfo:
    """Microns per level-0 pixel along x and y, and the metadata they came from.

    Attributes
    ----------
    x, y : float or None
        Microns per pixel; ``None`` when the file gives none.
    source : str
        Human-readable origin, e.g. ``"vendor property aperio.MPP"``, ``"OME PhysicalSizeX/Y"``,
        ``"DICOM PixelSpacing"``, ``"TIFF resolution tags"``, ``"user override"`` or ``"none"``.
    note : str
        Why a value was rejected (e.g. a 72-dpi placeholder), empty otherwise.
    """

    x: float | None
    y: float | None
    source: str
    note: str = ""

    @property
    def known(self) -> bool:
        return self.x is not None and self.y is not None


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def ome_physical_size(ome_xml: str) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the first OME Image, in microns, or ``None``."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            sx, sy = _float(el.get("PhysicalSizeX")), _float(el.get("PhysicalSizeY"))
            if sx is None or sy is None:
                return None
            fx = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            fy = _UNIT_TO_UM.get(el.get("PhysicalSizeYUnit", "µm"))
            if fx is None or fy is None:
                return None
            return sx * fx, sy * fy
    return None


def _tiff_tag_mpp(props: dict[str, Any]) -> tuple[float, float] | None:
    rx, ry = _float(props.get("tiff.XResolution")), _float(props.get("tiff.YResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    if rx is None or ry is None:
        return None
    per = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if per is None:
        return None
    return per / rx, per / ry


def _is_placeholder(mpp: float) -> bool:
    return any(abs(mpp - 25400.0 / dpi) < 1e-3 * mpp for dpi in _PLACEHOLDER_DPI)


def resolve_mpp(props: dict[str, Any], *, vendor: str | None, ome_xml: str | None = None,
                override: float | tuple[float, float] | None = None) -> MppInfo:
    """Work out microns per pixel from a slide's properties.

    Parameters
    ----------
    props : dict
        The backend's property map (openslide or tiffslide names).
    vendor : str or None
        The backend's vendor string (``"aperio"``, ``"hamamatsu"``, ``"dicom"``, ...).
    ome_xml : str, optional
        OME-XML of an OME-TIFF.
    override : float or (float, float), optional
        User-given mpp; wins over the file.
    """
    if override is not None:
        # one number (a numpy scalar, or text such as a CSV field gives) or an (x, y) pair
        pair = not isinstance(override, (str, bytes)) and hasattr(override, "__len__")
        ox, oy = tuple(override) if pair and len(override) == 2 else (None, None) if pair else (override, override)
        fx, fy = _float(ox), _float(oy)
        if fx is None or fy is None:
            from xtpath.errors import InvalidParameterError

            raise InvalidParameterError(f"mpp={override!r} is not a positive number of microns per pixel (or an "
                                        "(x, y) pair of them)")
        return MppInfo(fx, fy, "user override")
    if ome_xml:
        size = ome_physical_size(ome_xml)
        if size is not None:
            return MppInfo(size[0], size[1], "OME PhysicalSizeX/Y")
    if "aperio.MPP" in props and _float(props["aperio.MPP"]):
        v = _float(props["aperio.MPP"])
        return MppInfo(v, v, "vendor property aperio.MPP")
    lib_x = _float(props.get("openslide.mpp-x", props.get("tiffslide.mpp-x")))
    lib_y = _float(props.get("openslide.mpp-y", props.get("tiffslide.mpp-y")))
    if vendor == "dicom" and lib_x and lib_y:
        return MppInfo(lib_x, lib_y, "DICOM PixelSpacing")
    tags = _tiff_tag_mpp(props)
    if tags is not None:
        if _is_placeholder(tags[0]):
            return MppInfo(None, None, "none", note=f"TIFF resolution {25400.0 / tags[0]:.0f} dpi is a writer's "
                                                    "placeholder, not a scan resolution")
        return MppInfo(tags[0], tags[1], "TIFF resolution tags")
    if lib_x and lib_y:
        return MppInfo(lib_x, lib_y, f"vendor property ({vendor or 'unknown vendor'})")
    return MppInfo(None, None, "none")


def objective_power(props: dict[str, Any]) -> float | None:
    """Objective magnification (e.g. 20.0, 40.0) from the properties, or ``None``."""
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        v = _float(props.get(key))
        if v is not None:
            return v
    return None
