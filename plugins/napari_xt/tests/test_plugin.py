"""napari-xt with a real viewer (headless under Xvfb): reader, overlays, run widget, writer, sample data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_xt._layers import heatmap_layers  # noqa: E402
from napari_xt._reader import get_reader  # noqa: E402
from napari_xt._sample_data import sample_paths  # noqa: E402
from napari_xt._widget import RunWidget  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def white_slide(tmp_path_factory):
    """4096 x 4096 px of glass at 0.5 µm/px, 4 pyramid levels."""
    from xtpath.io.tiffwriter import write_pyramid_tiff

    p = tmp_path_factory.mktemp("napari") / "white.tif"
    write_pyramid_tiff(p, np.full((4096, 4096, 3), 255, np.uint8), 0.5, compression="jpeg", min_size=512)
    return p


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    """A 10 x 10 grid of demo tissue cells (100 regions), for a run long enough to cancel."""
    from xtpath.demo_data import CELL_PX, _load_textures
    from xtpath.io.tiffwriter import write_pyramid_tiff

    tex = _load_textures()
    tiles = tex["dense"] + tex["pink"]
    img = np.zeros((10 * CELL_PX, 10 * CELL_PX, 3), np.uint8)
    for r in range(10):
        for c in range(10):
            img[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = tiles[(r * 10 + c) % len(tiles)]
    p = tmp_path_factory.mktemp("napari") / "tissue.tif"
    write_pyramid_tiff(p, img, 0.5)
    return p


def test_manifest_validates():
    exe = Path(sys.executable).parent / "npe2"
    r = subprocess.run([str(exe), "validate", "napari-xt"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "valid" in (r.stdout + r.stderr).lower()


def test_reader_opens_a_slide_as_a_lazy_pyramid(make_napari_viewer):
    import dask.array as da

    from xtpath.io import open_slide

    viewer = make_napari_viewer(show=True)
    path = DATA / "test3-TRITC-2-560.ndpi"
    layers = viewer.open(path, plugin="napari-xt")
    layer = layers[0]
    s = open_slide(path)
    assert layer.multiscale and layer.rgb and len(layer.data) == s.level_count == 7
    assert all(isinstance(a, da.Array) for a in layer.data)  # nothing read until napari asks for tiles
    # level shapes: exact powers of two (3968 x 4864 is a multiple of 64, so no padding is needed)
    assert [tuple(a.shape) for a in layer.data] == [(4864 // 2**i, 3968 // 2**i, 3) for i in range(7)]
    assert tuple(layer.scale) == pytest.approx((s.mpp[1], s.mpp[0]))
    assert tuple(layer.contrast_limits) == (0, 255)
    assert layer.data[0].chunksize[:2] == (int(s.properties["openslide.level[0].tile-height"]),
                                           int(s.properties["openslide.level[0].tile-width"]))
    # a block read through the pyramid equals a direct read
    block = np.asarray(layer.data[2][100:164, 200:264])
    assert np.array_equal(block, s.read_region((800, 400), (64, 64), level=2))


def test_odd_sized_pyramids_are_padded_to_exact_downsamples(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    layer = viewer.open(DATA / "tcga-cr-7395-01a-01-ts1.svs", plugin="napari-xt")[0]
    (h0, w0, _), (h1, w1, _) = layer.data[0].shape, layer.data[1].shape
    assert (h0 / h1, w0 / w1) == (2.0, 2.0)  # 4443 x 3567 stored as 2221 x 1783 (2.0005): padded by 1 px
    assert w0 == 4444 and np.asarray(layer.data[0][3566:3567, 4443:4444]).min() == 255


def test_reader_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.tif").write_text("not a slide")
    assert get_reader(str(tmp_path / "notes.tif")) is None
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(DATA / "CMU-1-Small-Region.svs")) is not None


def test_reader_says_what_to_open_for_the_other_xtpath_outputs(make_napari_viewer, tmp_path):
    from xtpath.errors import XtpathError

    out = tmp_path / "scored"
    shutil.copytree(sample_paths()["scored"], out / "demo_slide")
    (out / "predictions.csv").write_text("slide_id,predicted\ndemo_slide,touch\n")
    run = sample_paths()["run"]
    cases = {out: f"{out}: the score folder of 1 slide(s); open one slide's folder, e.g. {out / 'demo_slide'} ",
             out / "demo_slide" / "prediction.json": f"open the slide's folder {out / 'demo_slide'} ",
             run: f"{run}: a trained model's run folder; open a slide, then choose this folder in Plugins > Run "
                  "xtpath model"}
    for path, msg in cases.items():
        read = get_reader(str(path))
        with pytest.raises(XtpathError) as e:
            read(str(path))
        assert msg in str(e.value)
    assert get_reader(str(out / "demo_slide")) is not None  # one slide's folder opens
    # a slide that failed to score: its folder (or prediction.json) gives the recorded reason
    (out / "bad").mkdir()
    (out / "bad" / "prediction.json").write_text(json.dumps(
        {"slide_id": "bad", "status": "failed", "error": "CorruptSlideError", "message": "bad.svs: a damaged tile"}))
    for path in (out / "bad", out / "bad" / "prediction.json"):
        with pytest.raises(XtpathError, match=r"bad: xtpath score failed on slide 'bad', so there are no results to "
                                              r"show: bad.svs: a damaged tile$"):
            get_reader(str(path))(str(path))
    viewer = make_napari_viewer(show=True)  # what the person opening the folder reads
    with pytest.raises(Exception) as e:
        viewer.open(str(out), plugin="napari-xt")
    assert "open one slide's folder" in str(e.value) and not len(viewer.layers)


def test_score_folder_of_a_moved_slide_draws_over_the_slide_open_from_its_new_place(make_napari_viewer, tmp_path):
    """prediction.json names where the slide was scored; after a move, the same bytes open elsewhere take its place."""
    from xtpath.errors import XtpathError
    from xtpath.io.files import file_fingerprint

    folder = tmp_path / "scored" / "demo_slide"
    shutil.copytree(sample_paths()["scored"], folder)
    moved = tmp_path / "elsewhere" / "renamed.tif"
    moved.parent.mkdir()
    shutil.copy(sample_paths()["slide"], moved)
    rec = json.loads((folder / "prediction.json").read_text())
    rec["slide_path"] = str(tmp_path / "gone" / "demo_slide.tif")
    rec["slide_fingerprint"] = file_fingerprint(moved)
    (folder / "prediction.json").write_text(json.dumps(rec))
    viewer = make_napari_viewer(show=True)
    with pytest.raises(XtpathError, match=r"its slide .*gone.demo_slide\.tif is not there \(moved, renamed or on another "
                                          r"machine\); open the slide from where it is now, then this folder again"):
        get_reader(str(folder))(str(folder))
    viewer.open(str(moved), plugin="napari-xt")
    viewer.open(str(folder), plugin="napari-xt")
    assert [lay.name for lay in viewer.layers] == ["renamed", "P(touch)", "region scores"]  # no second slide layer
    heat = viewer.layers["P(touch)"]
    assert heat.metadata["slide_wh"] == viewer.layers["renamed"].metadata["level0_wh"]
    assert len(viewer.layers["region scores"].features) == rec["n_regions"]
    # a different slide open under the old name does not stand in for it
    other = tmp_path / "other" / "demo_slide.tif"
    other.parent.mkdir()
    from xtpath.io.tiffwriter import write_pyramid_tiff

    write_pyramid_tiff(other, np.full((512, 512, 3), 200, np.uint8), 0.5)
    viewer.layers.clear()
    viewer.open(str(other), plugin="napari-xt")
    with pytest.raises(XtpathError, match="is not there"):
        get_reader(str(folder))(str(folder))


def _canvas_xy(viewer, shot_shape, world_yx):
    cam = viewer.camera
    h, w = shot_shape[:2]
    cy, cx = cam.center[-2:]
    return (int(round((world_yx[1] - cx) * cam.zoom + w / 2)), int(round((world_yx[0] - cy) * cam.zoom + h / 2)))


def test_heatmap_overlay_lands_on_its_region(make_napari_viewer, white_slide):
    """One region of a 4x4 grid (1024 level-0 px each) scored 1.0: red there on screen, white elsewhere."""
    viewer = make_napari_viewer(show=True)
    viewer.open(white_slide, plugin="napari-xt")
    cells = np.array([[1, 2]])
    (data, kwargs, _), = heatmap_layers(cells, np.array([[0.0, 1.0]]), ["neg", "pos"], 1024.0, (0.5, 0.5),
                                        only=[1])
    kwargs.update(colormap="red", opacity=1.0)
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    mpp = 0.5

    def world(level0_xy):  # level-0 continuous position -> world (y, x) in µm
        return ((level0_xy[1] - 0.5) * mpp, (level0_xy[0] - 0.5) * mpp)

    inside = _canvas_xy(viewer, shot.shape, world((2 * 1024 + 512, 1 * 1024 + 512)))
    outside = _canvas_xy(viewer, shot.shape, world((0 * 1024 + 512, 3 * 1024 + 512)))
    just_left = _canvas_xy(viewer, shot.shape, world((2 * 1024 - 40, 1 * 1024 + 512)))
    just_in = _canvas_xy(viewer, shot.shape, world((2 * 1024 + 40, 1 * 1024 + 512)))
    r, g, b = shot[inside[1], inside[0], :3].astype(int)
    assert r > 200 and g < 60 and b < 60, shot[inside[1], inside[0]]
    assert (shot[outside[1], outside[0], :3] > 230).all()
    assert (shot[just_left[1], just_left[0], :3] > 230).all()  # the overlay starts exactly at the region edge
    assert shot[just_in[1], just_in[0], 1] < 60


def test_heatmap_of_a_region_padded_past_the_edge_stops_at_the_edge(make_napari_viewer, white_slide):
    """Regions of 1024 px on a slide said to be 3584 px (3.5 regions) a side: the last region, padded past the
    edge, is red up to x = y = 3584 and not beyond (the white image goes on there, so the cut is visible)."""
    viewer = make_napari_viewer(show=True)
    viewer.open(white_slide, plugin="napari-xt")
    cells = np.array([[3, 3], [3, 0]])
    (data, kwargs, _), = heatmap_layers(cells, np.array([[0.0, 1.0], [0.0, 1.0]]), ["neg", "pos"], 1024.0,
                                        (0.5, 0.5), only=[1], slide_wh=(3584, 3584))
    assert data.shape == (4 * 8, 4 * 8)  # 8 heatmap pixels a region side
    assert np.isnan(data[28:, :]).all() and np.isnan(data[:, 28:]).all() and (data[24:28, 24:28] == 1).all()
    kwargs.update(colormap="red", opacity=1.0)
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)

    def world(level0_xy):
        return ((level0_xy[1] - 0.5) * 0.5, (level0_xy[0] - 0.5) * 0.5)

    def red(xy):
        x, y = _canvas_xy(viewer, shot.shape, world(xy))
        r, g, b = shot[y, x, :3].astype(int)
        return r > 200 and g < 60 and b < 60

    assert red((3072 + 300, 3072 + 300)) and red((3584 - 60, 3072 + 300)) and red((512, 3584 - 60))
    assert not red((3584 + 60, 3072 + 300)) and not red((3072 + 300, 3584 + 60)) and not red((512, 3584 + 60))
    assert not red((2048 + 512, 3072 + 300))  # a region not scored
    # a grid inside the slide keeps one pixel per region
    (inner, _, _), = heatmap_layers(cells, np.ones((2, 2)), ["neg", "pos"], 1024.0, (0.5, 0.5), only=[1],
                                    slide_wh=(4096, 4096))
    assert inner.shape == (4, 4)


def test_run_widget_scores_the_slide(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    name = viewer.open(sample_paths()["slide"], plugin="napari-xt")[0].name
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.run()
    qtbot.waitUntil(lambda: widget.state in ("done", "error"), timeout=180_000)
    assert widget.state == "done", widget.status.text()
    # results are named after their slide (a run on another slide keeps its own layers)
    assert f"{name}: P(touch)" in viewer.layers and f"{name}: region scores" in viewer.layers
    regions = viewer.layers[f"{name}: region scores"]
    n = widget.last_update.total
    assert len(regions.features) == n and {"prob_apart", "prob_touch"} <= set(regions.features.columns)
    assert np.allclose(regions.features["prob_apart"] + regions.features["prob_touch"], 1.0, atol=2e-4)
    assert widget.result.text().startswith(f"{name}: apart ") and widget.result.text().endswith("(final)")
    assert widget.progress.value() == 100 and widget.status.text() == f"done: {name}, {n} regions"
    heat = viewer.layers[f"{name}: P(touch)"].data
    assert np.isfinite(heat).sum() == n
    level0_wh = viewer.layers[name].metadata["level0_wh"]
    assert regions.metadata["slide_wh"] == list(level0_wh)  # exports cut at this slide, whatever is open later
    # the same slide again with another model (other class names, regions twice as large): its layers carry the
    # new model's classes and region size, and the old model's heatmap does not stay beside them
    other = tmp_path / "other_run"
    shutil.copytree(sample_paths()["run"], other)
    (other / "classes.json").write_text(json.dumps(["benign", "tumour"]))
    ext = json.loads((other / "extract.json").read_text())
    (other / "extract.json").write_text(json.dumps({**ext, "region_px": 2 * ext["region_px"]}))
    widget.model_edit.setText(str(other))
    widget.run()
    qtbot.waitUntil(lambda: widget.state in ("done", "error"), timeout=180_000)
    assert widget.state == "done", widget.status.text()
    assert f"{name}: P(tumour)" in viewer.layers and f"{name}: P(touch)" not in viewer.layers
    regions = viewer.layers[f"{name}: region scores"]
    assert regions.metadata["classes"] == ["benign", "tumour"] and {"prob_benign"} <= set(regions.features.columns)
    mpp = viewer.layers[name].metadata["mpp"]
    assert regions.metadata["region_size"] == pytest.approx(2 * ext["region_px"] * ext["target_mpp"] / mpp[0])
    assert tuple(regions.scale[-2:]) == pytest.approx((regions.metadata["region_size"] * mpp[1],
                                                       regions.metadata["region_size"] * mpp[0]))
    viewer.layers.remove(name)  # the slide closed: its result line goes too
    assert widget.result.text() == ""


@pytest.fixture
def held_run(monkeypatch):
    """The real scoring, held after its first chunk until the test sets the returned event: otherwise a fast
    machine scores all 100 regions before the test's click arrives (seen in CI) and there is nothing left."""
    import xtpath.score

    real, go_on = xtpath.score.iter_score_slide, threading.Event()

    def held_after_first_chunk(*args, **kwargs):
        for i, update in enumerate(real(*args, **kwargs)):
            yield update
            if i == 0:
                go_on.wait(120)

    monkeypatch.setattr(xtpath.score, "iter_score_slide", held_after_first_chunk)
    return go_on


def test_run_widget_cancels(make_napari_viewer, qtbot, tissue_slide, held_run):
    clicked = held_run
    viewer = make_napari_viewer(show=True)
    viewer.open(tissue_slide, plugin="napari-xt")
    widget = RunWidget(viewer)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.run()
    qtbot.waitUntil(lambda: widget.last_update is not None or widget.state == "error", timeout=120_000)
    assert widget.state == "running", widget.status.text()
    widget.cancel()
    clicked.set()
    qtbot.waitUntil(lambda: not widget.cancel_button.isEnabled(), timeout=120_000)
    assert widget.state == "cancelled" and "cancelled after" in widget.status.text()
    # stopped at the next chunk of 16 regions at the latest, with the heatmap of what was scored
    assert widget.last_update.done <= 32 < widget.last_update.total == 100
    assert f"cancelled after {widget.last_update.done} regions" in widget.status.text()


def test_closing_the_slide_mid_run_stops_the_run(make_napari_viewer, qtbot, tissue_slide, held_run):
    closed = held_run
    viewer = make_napari_viewer(show=True)
    name = viewer.open(tissue_slide, plugin="napari-xt")[0].name
    widget = RunWidget(viewer)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.run()
    qtbot.waitUntil(lambda: widget.last_update is not None or widget.state == "error", timeout=120_000)
    assert widget.state == "running", widget.status.text()
    qtbot.waitUntil(lambda: f"{name}: region scores" in viewer.layers, timeout=60_000)
    viewer.layers.remove(name)
    layers_after_close = [layer.name for layer in viewer.layers]
    closed.set()
    qtbot.waitUntil(lambda: not widget.cancel_button.isEnabled(), timeout=120_000)
    assert widget.state == "cancelled" and widget.status.text() == f"cancelled: {name} was closed"
    assert widget.result.text() == "" and widget.last_update.done < widget.last_update.total
    assert [layer.name for layer in viewer.layers] == layers_after_close  # nothing added for the closed slide


def test_run_widget_scores_the_field_of_view_only(make_napari_viewer, qtbot):
    """Zoomed on the slide's top-left corner, "field of view" scores only the regions the canvas shows."""
    viewer = make_napari_viewer(show=True)
    slide = viewer.open(sample_paths()["slide"], plugin="napari-xt")[0]
    mpp = slide.metadata["mpp"]
    widget = RunWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.scope.setCurrentText("field of view")
    h, w = viewer.canvas.size
    viewer.camera.zoom = w / (600 * mpp[0])  # 600 level-0 px across the canvas
    viewer.camera.center = (300 * mpp[1] * h / w, 300 * mpp[0])
    x, y, bw, bh = widget.field_of_view(slide)
    assert x == pytest.approx(0.5, abs=1.0) and y == pytest.approx(0.5, abs=1.0) and bw == pytest.approx(600, rel=1e-3)
    widget.run()
    qtbot.waitUntil(lambda: widget.state in ("done", "error"), timeout=180_000)
    assert widget.state == "done", widget.status.text()
    feats = viewer.layers[f"{slide.name} (field of view): region scores"].features
    assert widget.result.text().startswith(f"{slide.name} (field of view): ")
    rec = json.loads((sample_paths()["scored"] / "prediction.json").read_text())
    assert 0 < len(feats) < rec["n_regions"]
    size = rec["region_size_level0"]
    # every scored region overlaps the box the canvas shows
    assert all(fx < x + bw and fx + size > x and fy < y + bh and fy + size > y
               for fx, fy in zip(feats["x"], feats["y"]))


def test_run_widget_reports_a_slide_problem_in_one_line(make_napari_viewer, qtbot):
    """A slide without tissue: the widget's status says so; nothing is re-raised (pytest-qt fails on that)."""
    viewer = make_napari_viewer(show=True)
    viewer.open(DATA / "openslide-python-boxes.tiff", plugin="napari-xt")
    widget = RunWidget(viewer)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.mpp_edit.setText("0.5")  # the file has no resolution
    widget.run()
    qtbot.waitUntil(lambda: widget.state in ("done", "error"), timeout=120_000)
    assert widget.state == "error" and "no region has at least" in widget.status.text(), widget.status.text()
    assert widget.run_button.isEnabled()


def test_run_widget_scores_a_slide_without_mpp_at_the_typed_mpp(make_napari_viewer, qtbot, tmp_path):
    """A slide file with no resolution: Run says to type the µm/px; typed, the run scores at it, and the results
    lie on the slide, which is drawn in pixels."""
    import tifffile

    from xtpath.demo_data import CELL_PX, _load_textures

    tex = _load_textures()
    img = np.zeros((2 * CELL_PX, 3 * CELL_PX, 3), np.uint8)
    for i, tile in enumerate((tex["dense"] + tex["pink"])[:6]):
        r, c = divmod(i, 3)
        img[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = tile
    path = tmp_path / "no_mpp.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256))  # no resolution tags
    viewer = make_napari_viewer(show=True)
    slide = viewer.open(path, plugin="napari-xt")[0]
    assert slide.metadata["mpp"] is None
    widget = RunWidget(viewer)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.run()
    assert widget.state == "error" and widget.status.text() == (
        "error: no_mpp has no µm/px in its file: type it in the µm/px field (e.g. 0.25 at 40x, 0.5 at 20x) and "
        "press Run again")
    for bad in ("abc", "-1", "0", "inf"):
        widget.mpp_edit.setText(bad)
        widget.run()
        assert widget.state == "error" and f"µm/px must be a positive number (e.g. 0.25 at 40x, 0.5 at 20x), got " \
            f"{bad!r}" in widget.status.text()
    widget.mpp_edit.setText("0.5")
    widget.run()
    qtbot.waitUntil(lambda: widget.state in ("done", "error"), timeout=180_000)
    assert widget.state == "done", widget.status.text()
    feats = viewer.layers["no_mpp: region scores"].features
    size = json.loads((sample_paths()["scored"] / "prediction.json").read_text())["region_size_level0"]
    assert len(feats) == 6 and size == CELL_PX  # one region per cell at the typed 0.5 µm/px
    assert sorted(zip(feats["x"], feats["y"])) == sorted((c * CELL_PX, r * CELL_PX) for r in range(2) for c in range(3))
    heat = viewer.layers["no_mpp: P(touch)"]
    assert tuple(heat.scale) == (CELL_PX, CELL_PX)  # level-0 pixels, as the slide layer is drawn


def test_run_widget_says_what_is_missing(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    widget = RunWidget(viewer)
    widget.run()
    assert widget.state == "error" and "no slide open" in widget.status.text()


def test_export_to_geojson_and_read_back(make_napari_viewer, tmp_path, white_slide):
    from shapely.geometry import shape

    viewer = make_napari_viewer(show=True)
    slide = viewer.open(white_slide, plugin="napari-xt")[0]
    mpp = 0.5
    # a rectangle over level-0 x 1000..1400, y 600..900 (world = (level0 - 0.5) * mpp)
    y0, x0, y1, x1 = (600 - 0.5) * mpp, (1000 - 0.5) * mpp, (900 - 0.5) * mpp, (1400 - 0.5) * mpp
    # drawn as a user would: no metadata, the level-0 pixel size comes from the slide open in the viewer
    shapes = viewer.add_shapes([np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])], shape_type="polygon",
                               name="tumour", features={"class": ["Tumor"]})
    lab = np.zeros((8, 8), np.uint8)
    lab[2:4, 5:7] = 1  # 512-px label pixels: level-0 x 2560..3584, y 1024..2048
    labels = viewer.add_labels(lab, scale=(256.0, 256.0), translate=((256 - mpp) / 2, (256 - mpp) / 2),
                               name="mask", metadata={"slide_mpp": [mpp, mpp], "classes": ["background", "Stroma"]})
    out = tmp_path / "export.geojson"
    napari.save_layers(str(out), [shapes, labels], plugin="napari-xt")
    fc = json.loads(out.read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    by_class = {f["properties"]["classification"]["name"]: f for f in fc["features"]}
    tumour = shape(by_class["Tumor"]["geometry"])
    assert tumour.bounds == pytest.approx((1000, 600, 1400, 900), abs=1e-6)
    ring = by_class["Tumor"]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    stroma = shape(by_class["Stroma"]["geometry"])
    assert stroma.bounds == pytest.approx((2560, 1024, 3584, 2048), abs=1.0)
    assert stroma.area == pytest.approx(1024 * 1024, rel=0.01)
    assert slide.metadata["mpp"] == [mpp, mpp]
    # an ellipse is exported as an ellipse, a line as a line, and shapes are cut at the slide's border (4096 px)
    def world(x, y):
        return [(y - 0.5) * mpp, (x - 0.5) * mpp]

    drawn = viewer.add_shapes(
        [np.array([world(100, 100), world(500, 100), world(500, 500), world(100, 500)]),  # circle, r 200
         np.array([world(100, 1000), world(700, 1000)]),
         np.array([world(3000, 3000), world(5000, 3000), world(3000, 5000)])],  # half of it past the slide
        shape_type=["ellipse", "line", "polygon"], name="drawn", features={"class": ["Cell", "Scale", "Edge"]})
    out2 = tmp_path / "drawn.geojson"
    napari.save_layers(str(out2), [drawn], plugin="napari-xt")
    feats = {f["properties"]["classification"]["name"]: f for f in json.loads(out2.read_text())["features"]}
    circle, line, edge = (shape(feats[c]["geometry"]) for c in ("Cell", "Scale", "Edge"))
    assert circle.geom_type == "Polygon" and circle.area == pytest.approx(np.pi * 200 ** 2, rel=0.01)
    assert circle.centroid.coords[0] == pytest.approx((300, 300), abs=0.5)
    assert feats["Scale"]["geometry"] == {"type": "LineString", "coordinates": [[100.0, 1000.0], [700.0, 1000.0]]}
    assert line.length == pytest.approx(600) and line.area == 0
    # the triangle's part inside x, y < 4096: the square 3000..4096 less the corner past x + y = 8000 (legs of
    # 192 px); clamping its corners to the border instead would give a 1096-px right triangle, half of it
    assert edge.bounds == pytest.approx((3000, 3000, 4096, 4096)) and edge.is_valid
    assert edge.area == pytest.approx(1096 ** 2 - 192 ** 2 / 2)
    # the export opens again as Shapes in the same place (level-0 pixels -> microns over the slide)
    back = viewer.open(out, plugin="napari-xt")
    polys = {c: d for c, d, t in zip(back[0].features["class"], back[0].data, back[0].shape_type) if t == "polygon"}
    assert set(polys) == {"Tumor", "Stroma"}
    assert np.allclose(np.sort(polys["Tumor"], 0), np.sort(shapes.data[0], 0), atol=1e-6)


def test_points_and_lines_open_and_export_back(make_napari_viewer, tmp_path, white_slide):
    """QuPath points (e.g. cell counts) open as a Points layer, lines as paths; both export to the same places."""
    from shapely.geometry import Polygon, shape

    pts = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1000.5, 600.5]},
         "properties": {"objectType": "annotation", "classification": {"name": "Mitosis"}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[200.5, 300.5], [5000, 10]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Lymphocyte"}}}]}
    only_points = tmp_path / "cells.geojson"
    only_points.write_text(json.dumps(pts))
    viewer = make_napari_viewer(show=True)
    viewer.open(white_slide, plugin="napari-xt")
    mpp = 0.5
    layers = viewer.open(only_points, plugin="napari-xt")  # points only: one Points layer, no empty Shapes
    assert [(lay.name, type(lay).__name__) for lay in layers] == [("cells", "Points")]
    cells = layers[0]
    assert list(cells.features["class"]) == ["Mitosis", "Lymphocyte", "Lymphocyte"]
    assert np.allclose(cells.data[:2], [[600 * mpp, 1000 * mpp], [300 * mpp, 200 * mpp]])
    mixed = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[100, 1000], [700, 1000], [700, 1500]]},
         "properties": {"classification": {"name": "Margin"}}},
        {"type": "Feature", "geometry": {"type": "Polygon",
                                         "coordinates": [[[10, 10], [60, 10], [60, 40], [10, 10]]]},
         "properties": {"classification": {"name": "Tumor"}}}, *pts["features"][:1]]}
    (tmp_path / "mixed.geojson").write_text(json.dumps(mixed))
    shapes, points = viewer.open(tmp_path / "mixed.geojson", plugin="napari-xt")
    assert (shapes.name, points.name) == ("mixed", "mixed points")
    assert list(shapes.shape_type) == ["path", "polygon"] and list(shapes.features["class"]) == ["Margin", "Tumor"]
    out = tmp_path / "back.geojson"
    napari.save_layers(str(out), [shapes, points, cells], plugin="napari-xt")
    got = [(f["properties"]["classification"]["name"], f["geometry"]) for f in json.loads(out.read_text())["features"]]
    assert ("Margin", {"type": "LineString", "coordinates": [[100.0, 1000.0], [700.0, 1000.0], [700.0, 1500.0]]}) in got
    tumor = [shape(g) for n, g in got if n == "Tumor"]
    assert len(tumor) == 1 and tumor[0].equals(Polygon([(10, 10), (60, 10), (60, 40)]))
    points_back = sorted((n, tuple(g["coordinates"])) for n, g in got if g["type"] == "Point")
    # the point at x 5000 lies past the 4096-px slide and is left out
    assert points_back == [("Lymphocyte", (200.5, 300.5)), ("Mitosis", (1000.5, 600.5)), ("Mitosis", (1000.5, 600.5))]


def test_segmentation_folder_and_bare_mask_export_in_level0_pixels(make_napari_viewer, tmp_path, white_slide):
    """A multiscale segmentation mask from a score folder exports where its pixels lie on the slide."""
    import h5py
    from shapely.geometry import shape

    from xtpath.io.tiffwriter import label_names_metadata, write_pyramid_tiff

    folder = tmp_path / "white"
    folder.mkdir()
    mask = np.zeros((64, 64), np.uint8)  # 64 level-0 px (32 µm) per mask pixel
    mask[10:20, 5:30] = 1  # level-0 x 320..1920, y 640..1280
    mask[40:50, 40:64] = 2  # x 2560..4096, y 2560..3200
    names = {0: "background", 1: "Tumor", 2: "Stroma", 255: "not scored"}
    write_pyramid_tiff(folder / "mask.ome.tif", mask, 32.0, compression="zlib", ome=True, min_size=16,
                       ome_metadata=label_names_metadata(names, "white segmentation"))
    xy = np.array([(x, y) for y in range(0, 4096, 256) for x in range(0, 4096, 256)], np.int64)
    with h5py.File(folder / "regions.h5", "w") as f:
        f["coords"], f["probs"] = xy, np.full((len(xy), 3), 1 / 3, np.float32)
    (folder / "prediction.json").write_text(json.dumps(
        {"slide_id": "white", "status": "ok", "slide_path": str(white_slide), "slide_mpp": [0.5, 0.5],
         "region_size_level0": 256.0, "classes": ["background", "Tumor", "Stroma"], "probs": {}}))
    viewer = make_napari_viewer(show=True)
    viewer.open(folder, plugin="napari-xt")
    seg = viewer.layers["segmentation"]
    assert seg.multiscale and len(seg.data) == 3
    expected = {"Tumor": (320, 640, 1920, 1280), "Stroma": (2560, 2560, 4096, 3200)}
    for layer, name in ((seg, "folder"), (None, "bare")):
        if layer is None:  # the mask file on its own: classes from its OME metadata, mpp from prediction.json
            layer = viewer.open(folder / "mask.ome.tif", plugin="napari-xt")[0]
            assert layer.name == "white segmentation" and layer.metadata["classes"] == ["background", "Tumor",
                                                                                        "Stroma"]
        out = tmp_path / f"{name}.geojson"
        napari.save_layers(str(out), [layer], plugin="napari-xt")
        got = {f["properties"]["classification"]["name"]: shape(f["geometry"]).bounds
               for f in json.loads(out.read_text())["features"]}
        assert set(got) == set(expected)
        for c, b in expected.items():
            assert got[c] == pytest.approx(b, abs=1e-6), (name, c)


def test_sample_data_and_region_scores_export(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-xt", "demo")
    names = [lay.name for lay in layers]
    assert names == ["demo_slide", "P(touch)", "region scores"]
    rec = json.loads((sample_paths()["scored"] / "prediction.json").read_text())
    regions = viewer.layers["region scores"]
    assert len(regions.features) == rec["n_regions"]
    out = tmp_path / "regions.geojson"
    napari.save_layers(str(out), [regions], plugin="napari-xt")
    tiles = json.loads(out.read_text())["features"]
    assert len(tiles) == rec["n_regions"]
    t = tiles[0]["properties"]
    assert t["objectType"] == "tile" and set(t["measurements"]) == {"prob_apart", "prob_touch"}
    theirs = json.loads((sample_paths()["scored"] / "regions.geojson").read_text())["features"]
    assert [f["geometry"] for f in tiles] == [f["geometry"] for f in theirs]


def test_readme_screenshot(make_napari_viewer, qtbot, tmp_path):
    """The README's picture: the sample slide with its heatmap and the run widget, taken here."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    viewer.open_sample("napari-xt", "demo")
    widget = RunWidget(viewer)
    widget.model_edit.setText(str(sample_paths()["run"]))
    widget.result.setText("demo_slide: " + ", ".join(
        f"{c} {p:.3f}" for c, p in json.loads((sample_paths()["scored"] / "prediction.json").read_text())["probs"].items()))
    viewer.window.add_dock_widget(widget, name="Run xtpath model")
    viewer.layers.selection.active = viewer.layers["P(touch)"]
    qtbot.wait(300)
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[0] > 400 and shot[..., :3].std() > 10
    from PIL import Image

    target = DOCS / "screenshot.png" if os.environ.get("XTPATH_UPDATE_SCREENSHOT") else tmp_path / "screenshot.png"
    target.parent.mkdir(exist_ok=True)
    Image.fromarray(shot).save(target)
    assert target.stat().st_size > 10_000
    if os.environ.get("XTPATH_UPDATE_SCREENSHOT"):
        shutil.copy(target, tmp_path / "copy.png")


def test_exports_stop_at_the_slide_border_and_mixed_slides_say_why(make_napari_viewer, tmp_path, white_slide):
    from shapely.geometry import shape

    from xtpath.errors import XtpathError

    viewer = make_napari_viewer(show=True)
    viewer.open(white_slide, plugin="napari-xt")  # 4096 x 4096 px at 0.5 µm/px
    mpp = 0.5
    # drawn past the bottom-right corner: level-0 x 3900..4300, y 3800..4200
    y0, x0, y1, x1 = (3800 - 0.5) * mpp, (3900 - 0.5) * mpp, (4200 - 0.5) * mpp, (4300 - 0.5) * mpp
    shapes = viewer.add_shapes([np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])], shape_type="polygon",
                               name="edge")
    lab = np.zeros((3, 3), np.uint8)
    lab[2, 2] = 1  # 1536-px label pixels: x, y 3072..4608, past the slide
    labels = viewer.add_labels(lab, scale=(768.0, 768.0), translate=((768 - mpp) / 2, (768 - mpp) / 2),
                               name="mask", metadata={"slide_mpp": [mpp, mpp], "classes": ["background", "Stroma"]})
    out = tmp_path / "edge.geojson"
    napari.save_layers(str(out), [shapes, labels], plugin="napari-xt")
    feats = {f["properties"]["classification"]["name"]: shape(f["geometry"])
             for f in json.loads(out.read_text())["features"]}
    assert feats["edge"].bounds == pytest.approx((3900, 3800, 4096, 4096), abs=1e-6)
    assert feats["Stroma"].bounds == pytest.approx((3072, 3072, 4096, 4096), abs=1e-6)
    # a second slide of another pixel size: a drawn layer has no single level-0 pixel size, and napari shows
    # the plugin's reason (a ValueError would read as "not a valid writer")
    viewer.open(DATA / "CMU-1-Small-Region.svs", plugin="napari-xt")
    with pytest.raises(XtpathError, match="slides with different microns per pixel are open"):
        napari.save_layers(str(tmp_path / "two.geojson"), [shapes], plugin="napari-xt")
    assert not (tmp_path / "two.geojson").exists()
    # and reading a GeoJSON then is refused, not drawn in one slide's pixels as if they were µm
    from napari_xt._reader import read_geojson

    with pytest.raises(XtpathError, match=r"edge.geojson: slides of 2 resolutions are open \(0.499, 0.5 µm/px\)"):
        read_geojson(str(out))
