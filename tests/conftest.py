"""Shared fixtures: the real test slides in tests/data and synthetic pyramids written with tifffile."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


def read_manifest() -> dict[str, dict[str, str]]:
    with open(DATA / "MANIFEST.tsv", newline="") as f:
        return {row["filename"]: row for row in csv.DictReader(f, delimiter="\t")}


MANIFEST = read_manifest()

# Each real slide as xtpath opens it: a file, or the DICOM folder
REAL_SLIDES = {
    "CMU-1-Small-Region.svs": DATA / "CMU-1-Small-Region.svs",
    "tcga-cr-7395-01a-01-ts1.svs": DATA / "tcga-cr-7395-01a-01-ts1.svs",
    "openslide-python-small.svs": DATA / "openslide-python-small.svs",
    "openslide-python-boxes.tiff": DATA / "openslide-python-boxes.tiff",
    "test3-TRITC-2-560.ndpi": DATA / "test3-TRITC-2-560.ndpi",
    "OS-1-detail.ome.tif": DATA / "OS-1-detail.ome.tif",
    "OS-2-ndpi.ome.tif": DATA / "OS-2-ndpi.ome.tif",
    "dicom-boxes/boxes_0.dcm": DATA / "dicom-boxes",
    "dicom-camelyon-jpeg/multi_frame_jpeg_camelyon_challenge_image.dcm": DATA / "dicom-camelyon-jpeg",
    "dicom-camelyon-jp2k/multi_frame_jpeg2000_camelyon_challenge_image.dcm": DATA / "dicom-camelyon-jp2k",
    "dicom-highdicom-sm/sm_image.dcm": DATA / "dicom-highdicom-sm",
}
CORRUPT_SLIDE = DATA / "openslide-python-unreadable.svs"


@dataclass
class SquaresPyramid:
    """A synthetic slide: dark squares of known level-0 position on white, 2x box-averaged levels."""

    path: Path
    squares: list[tuple[int, int, int]]  # (x, y, side) in level-0 pixels
    size: tuple[int, int]  # level-0 (W, H)
    mpp: float
    color: tuple[int, int, int]


def _squares_image(w: int, h: int, squares, color) -> np.ndarray:
    img = np.full((h, w, 3), 255, np.uint8)
    for x, y, s in squares:
        img[y:y + s, x:x + s] = color
    return img


@pytest.fixture(scope="session")
def squares_pyramid(tmp_path_factory) -> SquaresPyramid:
    """Odd-sized (4099 x 3071) lossless pyramid; levels made by 2x2 box averaging with the odd edge dropped,
    so level k holds level 0 shrunk by exactly 2**k while the stored sizes give ratios like 2.0005."""
    from xtpath.io.tiffwriter import write_pyramid_tiff

    w, h, side = 4099, 3071, 96
    squares = [(x, y, side) for x in (211, 1037, 2205, 3890) for y in (133, 1501, 2950)]
    color = (40, 20, 90)
    path = tmp_path_factory.mktemp("pyr") / "squares.tif"
    write_pyramid_tiff(path, _squares_image(w, h, squares, color), 0.25, compression="zlib", min_size=200)
    return SquaresPyramid(path, squares, (w, h), 0.25, color)
