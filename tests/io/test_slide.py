"""Slide readers on every real test slide and on synthetic pyramids with known content."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import xtpath
from xtpath.errors import (
    CorruptRegionError,
    InvalidParameterError,
    MissingMppError,
    SlideNotFoundError,
    UnsupportedSlideError,
    XtpathError,
)
from xtpath.io import open_slide
from xtpath.io.slide import slide_name

from ..conftest import CORRUPT_SLIDE, DATA, MANIFEST, REAL_SLIDES

BOTH = ("openslide", "tiffslide")


def _openable(path):
    ok = []
    for b in BOTH:
        try:
            open_slide(path, backend=b).close()
            ok.append(b)
        except UnsupportedSlideError:
            pass
    return ok


@pytest.mark.parametrize("key", sorted(REAL_SLIDES))
def test_real_slide_matches_manifest(key):
    """Size, levels and mpp of every real slide as the manifest records them (openslide's view)."""
    row = MANIFEST[key]
    s = open_slide(REAL_SLIDES[key])
    w, h = (int(v) for v in row["dims"].split("x"))
    assert s.dimensions == (w, h)
    if s.backend == "openslide":
        assert s.level_count == int(row["levels"])
    if row["mpp"] and not key.endswith("boxes.tiff"):
        mx, my = (float(v) for v in row["mpp"].split("x"))
        assert s.mpp == pytest.approx((mx, my), abs=6e-4)
    # a thumbnail is RGB uint8 with the slide's aspect ratio
    th = s.thumbnail(64)
    assert th.dtype == np.uint8 and th.shape[2] == 3 and max(th.shape[:2]) == min(64, max(w, h))


@pytest.mark.parametrize("key", sorted(REAL_SLIDES))
def test_backends_agree(key):
    """Where both libraries open a slide they report the same geometry and mpp and return the same pixels."""
    path = REAL_SLIDES[key]
    backends = _openable(path)
    assert backends, f"no backend opens {key}"
    if len(backends) < 2:
        pytest.skip(f"only {backends[0]} reads {key}")
    a, b = (open_slide(path, backend=n) for n in BOTH)
    assert a.dimensions == b.dimensions
    common = min(a.level_count, b.level_count)
    assert a.level_dimensions[:common] == b.level_dimensions[:common]
    assert a.level_downsamples[:common] == pytest.approx(b.level_downsamples[:common])
    assert a.mpp == b.mpp and a.mpp_source == b.mpp_source
    w, h = a.dimensions
    size = (min(w, 300), min(h, 300))
    loc = ((w - size[0]) // 2, (h - size[1]) // 2)
    pa, pb = a.read_region(loc, size), b.read_region(loc, size)
    assert pa.shape == (size[1], size[0], 3)
    assert np.abs(pa.astype(int) - pb.astype(int)).mean() < 0.5
    if a.mpp:  # a resampled read at a coarser mpp, served from whichever level each library has
        qa = a.read_region((0, 0), (64, 64), mpp=a.mpp[0] * 3.3)
        qb = b.read_region((0, 0), (64, 64), mpp=a.mpp[0] * 3.3)
        assert np.abs(qa.astype(int) - qb.astype(int)).mean() < 1.5


def test_mpp_sources():
    assert open_slide(DATA / "CMU-1-Small-Region.svs").mpp_source == "vendor property aperio.MPP"
    assert open_slide(DATA / "OS-1-detail.ome.tif").mpp_source == "OME PhysicalSizeX/Y"
    assert open_slide(DATA / "dicom-camelyon-jpeg").mpp_source == "DICOM PixelSpacing"
    ndpi = open_slide(DATA / "test3-TRITC-2-560.ndpi")
    assert ndpi.mpp_source == "TIFF resolution tags" and ndpi.objective_power == 40
    over = open_slide(DATA / "CMU-1-Small-Region.svs", mpp=0.25)
    assert over.mpp == (0.25, 0.25) and over.mpp_source == "user override"
    # 72 dpi in the resolution tags is a writer's default, not a scan: treated as unknown
    boxes = open_slide(DATA / "openslide-python-boxes.tiff")
    assert boxes.mpp is None and "72 dpi" in boxes.mpp_info.note


def test_associated_images_and_vendor():
    s = open_slide(DATA / "CMU-1-Small-Region.svs")
    assert set(s.associated_images) == {"label", "macro", "thumbnail"}
    label = s.associated_images["label"]
    assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3
    assert s.vendor == "aperio" and s.objective_power == 20
    assert open_slide(DATA / "OS-2-ndpi.ome.tif").vendor == "ome-tiff"


def test_dicom_folder_and_file_open_the_same_slide():
    folder = open_slide(DATA / "dicom-camelyon-jpeg")
    file = open_slide(DATA / "dicom-camelyon-jpeg" / "multi_frame_jpeg_camelyon_challenge_image.dcm")
    assert folder.backend == file.backend == "openslide"
    assert folder.dimensions == file.dimensions == (1152, 700)
    assert np.array_equal(folder.read_region((100, 100), (64, 64)), file.read_region((100, 100), (64, 64)))
    assert folder.name == "dicom-camelyon-jpeg"


def test_auto_backend_choice():
    assert open_slide(DATA / "OS-1-detail.ome.tif").backend == "tiffslide"
    assert open_slide(DATA / "test3-TRITC-2-560.ndpi").backend == "openslide"
    assert open_slide(DATA / "dicom-boxes").backend == "openslide"
    assert open_slide(DATA / "CMU-1-Small-Region.svs", backend="tiffslide").backend == "tiffslide"


def test_slide_names():
    assert slide_name("a/b/OS-1-detail.ome.tif") == "OS-1-detail"
    assert slide_name("x/CMU-1.svs") == "CMU-1"
    assert slide_name("x/dicom-boxes") == "dicom-boxes"


# -- geometry: synthetic pyramids with known content -----------------------------------------------------------

@pytest.mark.parametrize("backend", BOTH)
def test_squares_land_where_they_are_at_every_level(squares_pyramid, backend):
    """Each dark square's centroid, read at many resolutions from every usable level, is where it was drawn
    (within 0.1 output pixel). Placing levels by the stored size ratio (2.0006, 4.0034, ...) moves the far
    squares by up to 0.7 output pixels and fails this."""
    s = open_slide(squares_pyramid.path, backend=backend)
    assert s.level_count == 5
    assert s.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)  # the libraries' stored-size ratio
    assert [s.level_scale(i) for i in range(5)] == [(2.0 ** i, 2.0 ** i) for i in range(5)]
    for ds in (1.0, 1.5, 2.0, 3.3, 4.0, 7.9, 16.0):
        for lv in range(s.level_count):
            if max(s.level_scale(lv)) > ds * 1.001:
                continue
            for x, y, side in squares_pyramid.squares:
                X, Y = x - 60, y - 60
                n = int(np.ceil((side + 120) / ds))
                a = s.read_region((X, Y), (n, n), downsample=ds, source_level=lv).astype(float)
                dark = (255.0 - a).sum(axis=2)
                jj, ii = np.meshgrid(np.arange(n), np.arange(n))
                cx = X + ((dark * jj).sum() / dark.sum() + 0.5) * ds
                cy = Y + ((dark * ii).sum() / dark.sum() + 0.5) * ds
                assert abs(cx - (x + side / 2)) / ds < 0.1, (ds, lv, x, y)
                assert abs(cy - (y + side / 2)) / ds < 0.1, (ds, lv, x, y)


def test_read_at_mpp_is_the_same_from_every_level(squares_pyramid):
    s = open_slide(squares_pyramid.path)
    x, y, side = squares_pyramid.squares[-1]  # far corner: where mis-scaled levels drift most
    reads = [s.read_region((x - 40, y - 40), (44, 44), mpp=1.0, source_level=lv).astype(int) for lv in range(3)]
    # output pixel j covers level-0 [x - 40 + 4j, x - 36 + 4j): the square spans j = 10 .. 33; keep 3 pixels
    # away from its edges, where a coarse level blurs the edge and the Lanczos filter rings
    j = np.arange(44)
    away = (np.abs(j - 10) > 3) & (np.abs(j - 34) > 3)
    far = away[:, None] & away[None, :]
    inside = ((j > 13) & (j < 31))[:, None] & ((j > 13) & (j < 31))[None, :]
    for r in reads:
        # inside the square its colour, outside white, whichever level served it ...
        assert np.abs(r[inside] - squares_pyramid.color).max() <= 2
        assert (r[far & ~inside] >= 250).all()  # white, but for the filter's faint ringing
        # ... and the reads differ only next to the edges (which a coarse level blurs)
        assert np.abs(r[far] - reads[0][far]).max() <= 5


def test_native_level_read_is_an_exact_crop(squares_pyramid):
    s = open_slide(squares_pyramid.path, backend="tiffslide")
    x, y, side = squares_pyramid.squares[0]
    a = s.read_region((x - 10, y - 10), (side + 20, side + 20), level=0)
    assert (a[10:10 + side, 10:10 + side] == squares_pyramid.color).all()
    assert (a[:10] == 255).all() and (a[:, :10] == 255).all()


@pytest.mark.parametrize("backend", BOTH)
def test_jpeg2000_levels_align(backend):
    """The TCGA JPEG2000 slide: level 1 (stored downsample 2.0005) read at 0.5 µm/px matches level 0 best with
    no shift, even at the far corner; a 2.0005 placement would shift it there by about one level-0 pixel."""
    s = open_slide(DATA / "tcga-cr-7395-01a-01-ts1.svs", backend=backend, mpp=0.25)
    assert s.level_downsamples[1] == pytest.approx(2.0005, abs=1e-4)
    assert s.level_scale(1) == (2.0, 2.0)
    loc = (3850, 2950)
    ref = s.read_region(loc, (200, 200), mpp=0.5, source_level=0).astype(float)
    mae = {dx: np.abs(ref - s.read_region((loc[0] + dx, loc[1] + dx), (200, 200), mpp=0.5,
                                           source_level=1).astype(float)).mean() for dx in (-1, 0, 1)}
    assert mae[0] < 0.75 * min(mae[-1], mae[1])
    assert mae[0] < 6.0  # JPEG2000 noise between independently compressed levels


@pytest.mark.parametrize("backend", BOTH)
def test_out_of_bounds_is_white(backend):
    s = open_slide(DATA / "CMU-1-Small-Region.svs", backend=backend)
    w, h = s.dimensions
    a = s.read_region((w - 8, h - 8), (16, 16))
    assert (a[8:, :] == 255).all() and (a[:, 8:] == 255).all()
    assert not (a[:8, :8] == 255).all()
    b = s.read_region((-8, -8), (16, 16), mpp=1.0)  # 4 output pixels outside, then the slide
    assert (b[:3, :3] == 255).all()  # out of reach of the filter
    assert b[:3].mean() > 253 and b[:, :3].mean() > 253  # filter ringing from tissue at the edge only
    assert b[8:, 8:].mean() < 250


def test_big_reads_are_tiled_without_seams(monkeypatch):
    s = open_slide(DATA / "CMU-1-Small-Region.svs")
    whole = s.read_region((100, 100), (700, 500), mpp=0.7)
    monkeypatch.setattr("xtpath.io.slide._MAX_WINDOW_PX", 120 * 120)
    tiled = s.read_region((100, 100), (700, 500), mpp=0.7)
    assert tiled.shape == whole.shape
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


# -- concurrency -------------------------------------------------------------------------------------------------

def _read_in_worker(args):
    slide_bytes, loc = args
    s = pickle.loads(slide_bytes)
    return s.read_region(loc, (64, 64), mpp=1.0)


@pytest.mark.parametrize("backend", BOTH)
def test_threads_and_processes_read_the_same_pixels(backend):
    s = open_slide(DATA / "CMU-1-Small-Region.svs", backend=backend)
    rng = np.random.default_rng(0)
    locs = [tuple(int(v) for v in rng.integers(0, 2000, 2)) for _ in range(24)]
    serial = [s.read_region(loc, (64, 64), mpp=1.0) for loc in locs]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda loc: s.read_region(loc, (64, 64), mpp=1.0), locs))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded))
    blob = pickle.dumps(s)
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            got = pool.map(_read_in_worker, [(blob, loc) for loc in locs[:6]])
        assert all(np.array_equal(a, b) for a, b in zip(serial[:6], got)), method


# -- errors --------------------------------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


def test_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(SlideNotFoundError) as e:
        open_slide(tmp_path / "missing.svs")
    assert "missing.svs" in _one_line(e.value)

    junk = tmp_path / "notes.svs"
    junk.write_text("not a slide")
    with pytest.raises(UnsupportedSlideError) as e:
        open_slide(junk)
    assert "notes.svs" in _one_line(e.value) and "not a slide" in str(e.value)

    s = open_slide(DATA / "tcga-cr-7395-01a-01-ts1.svs")
    assert s.mpp is None
    with pytest.raises(MissingMppError) as e:
        s.read_region((0, 0), (8, 8), mpp=0.5)
    msg = _one_line(e.value)
    assert "tcga-cr-7395" in msg and "--mpp" in msg and "'mpp' column" in msg

    with pytest.raises(InvalidParameterError, match="level=9"):
        s.read_region((0, 0), (8, 8), level=9)
    with pytest.raises(InvalidParameterError, match="backend='nope'"):
        open_slide(DATA / "CMU-1-Small-Region.svs", backend="nope")
    with pytest.raises(InvalidParameterError, match="mpp"):
        open_slide(DATA / "CMU-1-Small-Region.svs", mpp=-1.0)
    for cls in (SlideNotFoundError, UnsupportedSlideError, MissingMppError, CorruptRegionError):
        assert issubclass(cls, xtpath.XtpathError)


@pytest.mark.parametrize("backend", BOTH)
def test_corrupt_tile_says_which_region(backend):
    s = open_slide(CORRUPT_SLIDE, backend=backend)
    assert s.dimensions == (16, 16)
    with pytest.raises(CorruptRegionError) as e:
        s.read_region((4, 2), (8, 8))
    msg = _one_line(e.value)
    assert "openslide-python-unreadable.svs" in msg and "x=4, y=2" in msg
    assert e.value.location_xy == (4.0, 2.0) and e.value.size_wh == (8, 8)
    assert isinstance(e.value, XtpathError)


@pytest.mark.parametrize("key", ["CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "OS-1-detail.ome.tif",
                                 "OS-2-ndpi.ome.tif", "openslide-python-boxes.tiff", "test3-TRITC-2-560.ndpi"])
def test_direct_tile_decoding_equals_tiffslide(key):
    """tiffslide handles decode tiles straight from the TIFF (with a bounded cache); pixels equal tiffslide's
    own zarr arrays everywhere, edges included (NDPI keeps tiffslide's path)."""
    from xtpath.io._backends import TiffSlideHandle

    h = TiffSlideHandle(str(REAL_SLIDES[key]))
    assert (h._pages is None) == key.endswith(".ndpi")
    h.cache_bytes = 3 * 256 * 256 * 3  # a few tiles: exercise eviction
    for lv in range(len(h._levels)):
        W, H = h.level_dimensions[lv]
        for x, y, w, hh in [(0, 0, min(W, 300), min(H, 300)), (max(0, W - 123), max(0, H - 77), min(W, 123),
                                                                  min(H, 77)), (W // 3, H // 3, min(W - W // 3, 517), min(H - H // 3, 211))]:
            got = h.read_level(lv, x, y, w, hh)[0]
            want = np.asarray(h._levels[lv][y:y + hh, x:x + w])[..., :3]
            assert np.array_equal(got, want), (lv, x, y)
            assert h._cached <= max(h.cache_bytes, max(t.nbytes for t in h._cache.values()))


def test_a_folder_opens_only_as_dicom(tmp_path):
    import shutil

    with pytest.raises(UnsupportedSlideError, match="holds no DICOM files"):
        open_slide(DATA)  # slides of other formats in a folder are not a DICOM series
    for i, name in enumerate(("boxes_0.dcm", "boxes_1.dcm")):  # instances exported without the extension
        shutil.copy(DATA / "dicom-boxes" / name, tmp_path / f"instance{i}")
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    s = open_slide(tmp_path)
    ref = open_slide(DATA / "dicom-boxes")
    assert s.backend == "openslide" and s.dimensions == ref.dimensions and s.mpp == ref.mpp


def test_api_inputs_as_people_give_them_or_one_line_errors():
    """mpp as text (a CSV field) or a numpy number works; a bad mpp or region is an xtpath error, not numpy's."""
    path = DATA / "CMU-1-Small-Region.svs"
    assert open_slide(path, mpp="0.5").mpp == (0.5, 0.5)
    assert open_slide(path, mpp=np.float32(0.25)).mpp == (0.25, 0.25)
    assert open_slide(path, mpp=(0.25, 0.5)).mpp == (0.25, 0.5)
    for bad in ("abc", (1, 2, 3), -1):
        with pytest.raises(InvalidParameterError, match=r"is not a positive number of microns per pixel"):
            open_slide(path, mpp=bad)
    s = open_slide(path)
    for loc, size, msg in (((0, 0), (10 ** 6, 10 ** 6), (r"1,000,000 M pixels in one array is more than read_region "
                                                         r"returns \(at most 1,074 M\); read it in tiles")),
                           ((0,), (10, 10), r"give two numbers each, \(x, y\) in level-0 pixels and \(width, height\)"),
                           ((float("nan"), 0), (10, 10), r"location_xy=\(nan, 0\) must be finite")):
        with pytest.raises(InvalidParameterError, match=msg):
            s.read_region(loc, size, mpp=0.5)
    assert s.read_region((0, 0), (8, 6), mpp=0.5).shape == (6, 8, 3)
