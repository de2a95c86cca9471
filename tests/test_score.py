"""`xtpath score` / `report` and the Snakemake workflow, end to end on real slides with a trained tiny model."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from xtpath.cache import load_features
from xtpath.demo_data import DemoSpec, make_demo_dataset
from xtpath.errors import CacheError, InvalidParameterError
from xtpath.extract import ExtractConfig, extract_slides
from xtpath.io import open_slide, read_slides_csv
from xtpath.io.tiffwriter import read_label_names
from xtpath.score import parse_shard, score_slides, shard_rows
from xtpath.train import load_config, train

from .conftest import CORRUPT_SLIDE, REAL_SLIDES

ROOT = Path(__file__).resolve().parents[1]
ENC = {"encoder": "test_convnext", "encoder_px": 64, "region_px": 128, "target_mpp": 1.0}


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A demo dataset (8 slides), a classification run and a segmentation run trained on it."""
    root = tmp_path_factory.mktemp("score")
    csv_path = make_demo_dataset(root / "data", DemoSpec(n_slides=8, grid=6, seed=7))
    base = {"device": "cpu", "epochs": 2, "context_options": {"d_model": 32, "n_layers": 2}, "lr": 3e-3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(csv_path, root / "cls", load_config(None, {**base, **ENC, "cache": str(root / "traincache")}),
              show_progress=False, log=lambda m: None)
        train(csv_path, root / "seg", load_config(None, {**base, "task": "segmentation",
                                                         "cache": str(root / "traincache")}),
              show_progress=False, log=lambda m: None)
    return root, csv_path


def _xtpath(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "xtpath", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900, **kw)


def _predictions(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_classification_outputs(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)
    out = tmp_path / "out"
    summary = score_slides(rows, root / "cls", out)
    assert sorted(summary.scored) == sorted(r.slide_id for r in rows) and not summary.failed
    preds = _predictions(out)
    assert list(preds[0]) == ["slide_id", "predicted", "p_apart", "p_touch", "n_regions", "seconds"]
    assert [p["slide_id"] for p in preds] == [r.slide_id for r in rows]
    for p, row in zip(preds, rows):
        probs = np.array([float(p["p_apart"]), float(p["p_touch"])])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert p["predicted"] == ["apart", "touch"][int(probs.argmax())]
        sf = load_features(out / "cache" / f"{row.slide_id}.h5")
        assert int(p["n_regions"]) == len(sf)
        folder = out / row.slide_id
        with h5py.File(folder / "regions.h5") as f:
            assert np.array_equal(f["coords"][:], sf.coords)
            rp = f["probs"][:]
            assert rp.shape == (len(sf), 2) and np.allclose(rp.sum(1), 1.0, atol=1e-5)
        fc = json.loads((folder / "regions.geojson").read_text())
        assert len(fc["features"]) == len(sf)
        size = sf.region_size_level0
        for feat, (x, y), pr in zip(fc["features"], sf.coords, rp):
            assert feat["properties"]["objectType"] == "tile"
            ring = np.array(feat["geometry"]["coordinates"][0])
            assert np.array_equal(ring[0], ring[-1])
            assert ring.min(0) == pytest.approx([x, y]) and ring.max(0) == pytest.approx([x + size, y + size])
            m = feat["properties"]["measurements"]
            assert m["prob_apart"] == pytest.approx(pr[0], abs=1e-6) and m["prob_touch"] == pytest.approx(pr[1],
                                                                                                          abs=1e-6)
        from PIL import Image

        assert Image.open(folder / "heatmap.png").size[0] >= 400
        rec = json.loads((folder / "prediction.json").read_text())
        assert rec["status"] == "ok" and rec["predicted"] == p["predicted"]


def test_segmentation_outputs(runs, tmp_path):
    import tiffslide

    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:2]
    out = tmp_path / "seg"
    s = score_slides(rows, root / "seg", out, cache_dir=root / "traincache")
    assert len(s.scored) == 2
    for row in rows:
        folder = out / row.slide_id
        slide = open_slide(row.path)
        ts = tiffslide.TiffSlide(folder / "mask.ome.tif")
        sf = load_features(root / "traincache" / f"{row.slide_id}.h5")
        # the mask covers the slide at region_um / m µm per pixel (here 128 µm regions, one cell per region)
        assert float(ts.properties["tiffslide.mpp-x"]) == pytest.approx(128.0, rel=1e-3)
        assert ts.dimensions == (int(np.ceil(slide.dimensions[0] / 256)), int(np.ceil(slide.dimensions[1] / 256)))
        mask = np.asarray(ts.read_region((0, 0), 0, ts.dimensions, as_array=True))
        mask = mask[..., 0] if mask.ndim == 3 else mask
        assert set(np.unique(mask)) <= {0, 1, 2, 255}
        assert read_label_names(folder / "mask.ome.tif") == {0: "background", 1: "dense", 2: "pink",
                                                             255: "not scored"}
        assert (mask != 255).sum() == len(sf)  # one cell per scored region
        fc = json.loads((folder / "regions.geojson").read_text())
        names = {f["properties"]["classification"]["name"] for f in fc["features"]}
        assert names <= {"dense", "pink"} and names
        for f in fc["features"]:
            assert f["properties"]["objectType"] == "annotation"
            xs = np.array([pt for ring in f["geometry"]["coordinates"] for pt in ring])
            assert xs.min() >= 0 and xs[:, 0].max() <= slide.dimensions[0] and xs[:, 1].max() <= slide.dimensions[1]
    assert _xtpath("report", out).returncode == 0


def test_report_of_a_segmenter_compares_masks_on_held_out_slides(runs, tmp_path):
    """Dice and IoU from the written mask.ome.tif files against the GeoJSON masks equal what training measured
    on its test split with the same model (a different path: model outputs against cache-aligned targets)."""
    root, csv_path = runs
    out = tmp_path / "seg"
    score_slides(read_slides_csv(csv_path), root / "seg", out, cache_dir=root / "traincache")
    r = _xtpath("report", out, "--labels", csv_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report" / "report.json").read_text())
    trained = json.loads((root / "seg" / "report.json").read_text())
    assert trained["evaluated_on"] == "test"
    with open(root / "seg" / "splits.csv") as f:
        held_out = sum(x["split"] == "test" for x in csv.DictReader(f))
    assert rep["n_labelled"] == held_out and rep["excluded_seen"] == 8 - held_out
    for k in ("dice", "iou", "accuracy"):
        assert rep["metrics"][k] == pytest.approx(trained["metrics"][k], abs=1e-9), k
    assert rep["metrics"]["dice_per_class"] == pytest.approx(trained["metrics"]["dice_per_class"], nan_ok=True)
    d = rep["metrics"]["dice_per_class"]  # None (NaN): a class in neither the scored nor the true masks
    assert "Dice per class: " + ", ".join(f"{c} {'-' if v is None else f'{v:.4f}'}" for c, v in
                                          zip(["background", "dense", "pink"], d)) in r.stdout, r.stdout
    assert (out / "report" / "segmentation.png").exists()
    # a mask that disagrees everywhere: painting the whole slide as one class changes Dice as it should
    rows = read_slides_csv(csv_path)
    test_ids = [x["slide_id"] for x in csv.DictReader(open(root / "seg" / "splits.csv")) if x["split"] == "test"]
    row = next(x for x in rows if x.slide_id == test_ids[0])
    W, H = open_slide(row.path).dimensions
    whole = tmp_path / "whole.geojson"
    whole.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "pink"}},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [W, 0], [W, H], [0, H], [0, 0]]]}}]}))
    one = tmp_path / "one.csv"
    one.write_text(f"slide_id,mask\n{row.slide_id},{whole}\n")
    r = _xtpath("report", out, "--labels", one)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "report" / "report.json").read_text())["metrics"]
    mask = tifffile.imread(out / row.slide_id / "mask.ome.tif", level=0)
    scored = mask[mask != 255]
    pink = float((scored == 2).mean())
    assert m["accuracy"] == pytest.approx(pink)  # every scored cell is pink in this ground truth
    assert m["dice_per_class"][2] == pytest.approx(2 * pink / (pink + 1))
    # ground truth without masks, or masks with a class the model does not know: one line each
    labels_only = tmp_path / "labels_only.csv"
    for text in ("slide_id,label\nx,touch\n", "slide_id,mask\nx,\n"):  # no column, or only empty cells
        labels_only.write_text(text)
        r = _xtpath("report", out, "--labels", labels_only)
        assert r.returncode == 1 and "no row gives a mask (no mask column, or its cells are empty)" in r.stderr, \
            r.stderr
    whole.write_text(whole.read_text().replace('"pink"', '"stroma"'))
    r = _xtpath("report", out, "--labels", one)
    assert r.returncode == 1 and "class 'stroma' is not one of background, dense, pink" in r.stderr, r.stderr


def test_two_device_processes_score_each_slide_once_with_the_same_result(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)
    one, two = tmp_path / "one", tmp_path / "two"
    score_slides(rows, root / "cls", one, cache_dir=root / "traincache")
    events = []
    s = score_slides(rows, root / "cls", two, cache_dir=root / "traincache", devices=["cpu", "cpu"],
                     progress=lambda e, d: events.append(e))
    assert sorted(s.scored) == sorted(r.slide_id for r in rows) and not s.failed
    a = {p["slide_id"]: p for p in _predictions(one)}
    b = _predictions(two)
    assert sorted(p["slide_id"] for p in b) == sorted(a)  # every slide exactly once
    for p in b:
        assert p["predicted"] == a[p["slide_id"]]["predicted"]
        assert float(p["p_touch"]) == pytest.approx(float(a[p["slide_id"]]["p_touch"]), abs=1e-6)
    assert events  # progress from the worker processes reached the parent


def test_report_with_labels(runs, tmp_path):
    root, csv_path = runs
    out = tmp_path / "out"
    score_slides(read_slides_csv(csv_path), root / "cls", out, cache_dir=root / "traincache")
    r = _xtpath("report", out, "--labels", csv_path)
    assert r.returncode == 0, r.stderr
    assert "8 slides scored, 0 failed" in r.stdout and "balanced_accuracy" in r.stdout
    rep = json.loads((out / "report" / "report.json").read_text())
    # the model trained and validated on most of these slides: only its test split counts
    with open(root / "cls" / "splits.csv") as f:
        table = list(csv.DictReader(f))
    parts = {x["slide_id"]: x["split"] for x in table}
    held_classes = {x["label"] for x in table if x["split"] == "test"}
    held_out = sum(v == "test" for v in parts.values())
    assert len(parts) == 8 and 1 <= held_out < 8
    assert rep["excluded_seen"] == 8 - held_out and f"left out {8 - held_out} labelled slides" in r.stdout
    assert rep["n_labelled"] == held_out and set(rep["metrics"]) >= {"accuracy", "auc", "f1", "confusion_matrix"}
    # a ROC curve needs held-out slides of both classes (no roc.png otherwise); the confusion matrix is always drawn
    assert (out / "report" / "roc.png").exists() == (len(held_classes) == 2)
    assert (out / "report" / "confusion.png").exists()
    assert sum(map(sum, rep["metrics"]["confusion_matrix"])) == held_out
    # labels alone (no path column), a row without a label and a labelled slide that was never scored
    labels = tmp_path / "labels.csv"
    rows = read_slides_csv(csv_path)
    labels.write_text("slide_id,label\n" + "".join(f"{r.slide_id},{r.label if i else ''}\n" for i, r in enumerate(rows))
                      + "never_scored,touch\n")
    r = _xtpath("report", out, "--labels", labels)
    assert r.returncode == 0, r.stderr
    assert "1 labelled slides have no prediction (not scored, or failed): never_scored" in r.stdout
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["labelled_not_scored"] == ["never_scored"]
    assert rep.get("n_labelled", 0) + rep["excluded_seen"] == 7  # the first row has no label
    # only the test slides scored: the training ones are not "missing", they are counted apart
    only_test = tmp_path / "only_test"
    score_slides([r for r in rows if parts[r.slide_id] == "test"], root / "cls", only_test,
                 cache_dir=root / "traincache")
    r = _xtpath("report", only_test, "--labels", csv_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads((only_test / "report" / "report.json").read_text())
    assert rep["labelled_not_scored"] == [] and rep["not_scored_seen"] == 8 - held_out
    assert "have no prediction" not in r.stdout
    assert f"{8 - held_out} labelled slides are not scored and are the model's training or validation slides" in r.stdout
    # labels of training slides only: no metrics, and the plots of the earlier report go
    seen_only = tmp_path / "seen.csv"
    seen_only.write_text("slide_id,label\n" + "".join(f"{r.slide_id},{r.label}\n" for r in rows
                                                      if parts[r.slide_id] != "test"))
    r = _xtpath("report", out, "--labels", seen_only)
    assert r.returncode == 0 and "no metrics: none of the labelled slides" in r.stdout, r.stdout
    assert "metrics" not in json.loads((out / "report" / "report.json").read_text())
    assert not (out / "report" / "roc.png").exists() and not (out / "report" / "confusion.png").exists()
    # a labels file that is not there, or without slide_id: one line saying what --labels needs
    r = _xtpath("report", out, "--labels", tmp_path / "nofile.csv")
    assert r.returncode == 1 and r.stderr.strip() == f"error: --labels {tmp_path / 'nofile.csv'}: no such file; " \
        "give a CSV with slide_id,label columns (a classifier's scores) or slide_id,mask (a segmenter's)", r.stderr
    (tmp_path / "l.csv").write_text("id,lab\nx,touch\n")
    r = _xtpath("report", out, "--labels", tmp_path / "l.csv")
    assert r.returncode == 1 and r.stderr.strip() == "error: l.csv:1: missing column(s) slide_id (found: id, lab); " \
        "the header needs slide_id", r.stderr
    # the scoring model's run folder moved away: no slide can be left out, and the report says so
    moved = tmp_path / "moved_scores"
    shutil.copytree(out, moved)
    meta = json.loads((moved / "score.json").read_text())
    (moved / "score.json").write_text(json.dumps({**meta, "model": str(tmp_path / "gone" / "cls")}))
    r = _xtpath("report", moved, "--labels", csv_path)
    assert r.returncode == 0, r.stderr
    assert f"warning: the model's training slides are unknown ({tmp_path / 'gone' / 'cls' / 'splits.csv'}" in r.stdout
    assert "none could be left out: the metrics may include slides it trained on" in r.stdout
    rep = json.loads((moved / "report" / "report.json").read_text())
    assert rep["n_labelled"] == 8 and "excluded_seen" not in rep and "splits.csv" in rep["training_slides_unknown"]
    # another cohort whose slide reuses a training slide's id: a different file (fingerprint), so it is held out
    trained_id = next(r.slide_id for r in rows if parts[r.slide_id] == "train")
    other_file = next(r.path for r in rows if r.slide_id != trained_id)
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(f"slide_id,path,label\n{trained_id},{other_file},touch\n")
    cohort_out = tmp_path / "cohort_scores"
    score_slides(read_slides_csv(cohort), root / "cls", cohort_out, cache_dir=tmp_path / "cohort_cache")
    r = _xtpath("report", cohort_out, "--labels", cohort)
    assert r.returncode == 0, r.stderr
    rep = json.loads((cohort_out / "report" / "report.json").read_text())
    assert rep["same_id_other_slide"] == [trained_id] and rep["n_labelled"] == 1 and not rep.get("excluded_seen")
    assert "kept 1 slides whose slide_ids are training slides' but whose files are other slides" in r.stdout
    # the training slide itself under its id is still left out
    same = tmp_path / "same.csv"
    same.write_text(f"slide_id,path,label\n{trained_id},{next(r.path for r in rows if r.slide_id == trained_id)},"
                    "touch\n")
    same_out = tmp_path / "same_scores"
    score_slides(read_slides_csv(same), root / "cls", same_out, cache_dir=tmp_path / "cohort_cache2")
    assert _xtpath("report", same_out, "--labels", same).returncode == 0
    rep = json.loads((same_out / "report" / "report.json").read_text())
    assert rep["excluded_seen"] == 1 and "same_id_other_slide" not in rep
    # a training run's folder is not a score folder
    r = _xtpath("report", root / "cls")
    assert r.returncode == 1 and "not a folder written by xtpath score" in r.stderr, r.stderr


def test_slide_ids_that_name_score_outputs_are_refused_before_anything_is_written(runs, tmp_path):
    root, csv_path = runs
    lines = Path(csv_path).read_text().splitlines()
    first, second = lines[1].split(",", 1), lines[2].split(",", 1)
    bad = tmp_path / "reserved.csv"
    bad.write_text("\n".join([lines[0], "cache," + first[1], "score.json," + second[1]]) + "\n")
    out = tmp_path / "out"
    r = _xtpath("score", bad, "--model", root / "cls", "--out", out)
    assert r.returncode == 1
    for line, sid in ((2, "cache"), (3, "score.json")):
        assert f"error: reserved.csv:{line}: slide_id '{sid}' is a name xtpath score uses in {out} (cache, " \
               "failures.csv, predictions.csv, report, score.json); rename the slide in the CSV" in r.stderr, r.stderr
    assert not out.exists()


def test_an_extraction_failure_says_where_score_takes_its_settings(runs, tmp_path):
    # a blank (glass only) slide: extract would say "lower --min-tissue", an option score does not take
    from xtpath.io.tiffwriter import write_pyramid_tiff

    root, _ = runs
    glass = tmp_path / "glass.tif"
    write_pyramid_tiff(glass, np.full((1024, 1024, 3), 250, np.uint8), 1.0, compression="jpeg", min_size=256)
    (tmp_path / "g.csv").write_text(f"slide_id,path\nglass,{glass}\n")
    summary = score_slides(read_slides_csv(tmp_path / "g.csv"), root / "cls", tmp_path / "out")
    msg = summary.failed["glass"]
    assert "no region has at least 25% tissue" in msg and "lower --min-tissue (xtpath score extracts with the " \
        f"training run's settings, {root / 'cls' / 'extract.json'}; to change them, make the cache with xtpath " \
        "extract, the same encoder, --target-mpp and --region-px, and pass it with --cache)" in msg, msg
    assert msg in (tmp_path / "out" / "failures.csv").read_text()


def test_shards_cover_the_csv_exactly_once(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)
    out = tmp_path / "sharded"
    for i in range(3):
        r = _xtpath("score", csv_path, "--model", root / "cls", "--out", out, "--cache", root / "traincache",
                    "--shard", f"{i}/3", "--devices", "cpu")
        assert r.returncode == 0, r.stderr
    ids = [p["slide_id"] for p in _predictions(out)]
    assert sorted(ids) == sorted(r.slide_id for r in rows) and len(ids) == len(set(ids))
    parts = [shard_rows(list(range(10)), (i, 4)) for i in range(4)]  # type: ignore[arg-type]
    assert sorted(x for p in parts for x in p) == list(range(10))
    with pytest.raises(Exception, match="I must be between 0 and N-1"):
        parse_shard("3/3")


def test_resume_after_a_kill_scores_only_what_is_missing(runs, tmp_path):
    root, csv_path = runs
    out = tmp_path / "killed"
    args = ["score", csv_path, "--model", root / "cls", "--out", out, "--cache", root / "traincache",
            "--devices", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xtpath", *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        p = out / "predictions.csv"
        if p.exists() and len(p.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(_predictions(out))
    assert 2 <= before < 8
    # a slide's folder appears whole (written under a hidden name, then moved): never without its record
    visible = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert visible and all((d / "prediction.json").exists() and (d / "regions.h5").exists() for d in visible)
    r = _xtpath(*args)
    assert r.returncode == 0, r.stderr
    assert f"{8 - before} scored, {before} already scored" in r.stdout
    ids = [p["slide_id"] for p in _predictions(out)]
    assert sorted(ids) == sorted(x.slide_id for x in read_slides_csv(csv_path))
    assert not list(out.glob(".*.partial")) and all((out / i / "heatmap.png").exists() for i in ids)


def test_a_model_refuses_a_cache_from_another_encoder(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:1]
    other = tmp_path / "other"
    extract_slides(rows, other, ExtractConfig(**{**ENC, "encoder": "test_resnet"}, num_workers=0))
    with pytest.raises(CacheError, match="made with encoder='test_resnet' but the model was trained on "
                                         "'test_convnext'"):
        score_slides(rows, root / "cls", tmp_path / "out", cache_dir=other)
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.slow
def test_snakemake_workflow_on_three_slides_one_corrupt(runs, tmp_path):
    root, csv_path = runs
    good = read_slides_csv(csv_path)[:2]
    # as Excel writes a CSV in some locales (a UTF-8 mark, ';'); a slide file that is gone is one failed slide;
    # an output folder with a space in its name
    slides = tmp_path / "slides.csv"
    slides.write_text("\ufeffslide_id;path;label\n" + "".join(f"{r.slide_id};{r.path};{r.label}\n" for r in good)
                      + f"broken;{CORRUPT_SLIDE};touch\ngone;{tmp_path / 'gone.svs'};touch\n", encoding="utf-8")
    out = tmp_path / "wf out"
    exe = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{exe}:{os.environ['PATH']}"}
    snake = [str(exe / "snakemake"), "-s", str(ROOT / "workflows" / "Snakefile"),
             "--configfile", str(ROOT / "workflows" / "config.yaml"), "--cores", "2",
             "--config", f"slides={slides}", f"model={root / 'cls'}", f"out={out}", f"labels={slides}",
             "gpus_per_job=0", "devices=cpu"]
    r = subprocess.run(snake, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    preds = _predictions(out)
    assert sorted(p["slide_id"] for p in preds) == sorted(x.slide_id for x in good)
    for p in preds:
        assert float(p["p_apart"]) + float(p["p_touch"]) == pytest.approx(1.0, abs=1e-5)
    with open(out / "failures.csv") as f:
        fails = list(csv.DictReader(f))
    assert [x["slide_id"] for x in fails] == ["broken", "gone"] and "cannot decode" in fails[0]["message"]
    assert "no such file" in fails[1]["message"]
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["n_scored"] == 2 and rep["n_failed"] == 2
    assert rep.get("n_labelled", 0) + rep.get("excluded_seen", 0) == 2  # training slides are left out
    for x in good:
        assert (out / x.slide_id / "heatmap.png").exists()
    # a second run has nothing to do
    again = subprocess.run([*snake, "-n"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the README's recipe to redo slides: --forcerun their step files; the broken one is now readable
    fixed = tmp_path / f"fixed{Path(good[0].path).suffix}"
    shutil.copy(good[0].path, fixed)
    slides.write_text(slides.read_text().replace(str(CORRUPT_SLIDE), str(fixed)))
    first = json.loads((out / good[1].slide_id / "prediction.json").read_text())
    redo = subprocess.run([*snake, "--forcerun", f"{out}/steps/broken.extracted",
                           f"{out}/{good[1].slide_id}/prediction.json"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert redo.returncode == 0, redo.stderr[-4000:]
    preds = _predictions(out)
    assert sorted(p["slide_id"] for p in preds) == sorted([x.slide_id for x in good] + ["broken"])
    with open(out / "failures.csv") as f:
        assert [x["slide_id"] for x in csv.DictReader(f)] == ["gone"]
    second = json.loads((out / good[1].slide_id / "prediction.json").read_text())
    assert second["probs"] == pytest.approx(first["probs"]) and second["seconds"] != first["seconds"]
    assert json.loads((out / "report" / "report.json").read_text())["n_scored"] == 3


def test_snakemake_workflow_checks_its_settings_before_any_job(runs, tmp_path):
    """`snakemake -n` finds a wrong setting: one line naming it, before a job per slide would fail on it."""
    root, csv_path = runs
    good = read_slides_csv(csv_path)[:1]
    slides = tmp_path / "slides.csv"
    slides.write_text("slide_id,path\n" + f"{good[0].slide_id},{good[0].path}\nbroken,{CORRUPT_SLIDE}\n")
    exe = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{exe}:{os.environ['PATH']}"}

    def dry(*settings):
        cmd = [str(exe / "snakemake"), "-s", str(ROOT / "workflows" / "Snakefile"), "--configfile",
               str(ROOT / "workflows" / "config.yaml"), "--cores", "1", "-n", "--config", f"slides={slides}",
               f"model={root / 'cls'}", f"out={tmp_path / 'out'}", "gpus_per_job=0", *settings]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, check=False)
        return r.returncode, r.stdout + r.stderr

    rc, text = dry("exclude=broken")  # one id, not the set of its letters
    assert rc == 0 and f"slide={good[0].slide_id}" in text and "slide=broken" not in text, text[-3000:]
    bad = {("exclude=[brokn]",): "slide_id(s) to exclude that are in no row: 'brokn'; check their spelling",
           (f"model={tmp_path / 'nomodel'}",): f"{tmp_path / 'nomodel'}: no such run folder",
           (f"labels={tmp_path / 'nolabels.csv'}",): f"labels='{tmp_path / 'nolabels.csv'}': no such file",
           ("gpu_per_job=0",): "workflow config: unknown setting 'gpu_per_job'; did you mean 'gpus_per_job'?",
           ("mem_mb=abc",): "workflow config: mem_mb='abc' must be a whole number of at least 1",
           ("score_minutes=0",): "workflow config: score_minutes=0 must be a whole number of at least 1"}
    for settings, msg in bad.items():
        rc, text = dry(*settings)
        assert rc != 0 and msg in text, (settings, text[-3000:])
        assert "slide=" not in text  # no job was planned


def test_a_model_refuses_caches_made_at_another_resolution(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:1]
    other = tmp_path / "other"
    extract_slides(rows, other, ExtractConfig(**{**ENC, "target_mpp": 2.0}, num_workers=0))
    with pytest.raises(CacheError, match="made with target_mpp=2.0 but the model was trained on 1.0"):
        score_slides(rows, root / "cls", tmp_path / "out", cache_dir=other)
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_an_output_folder_holds_the_scores_of_one_model(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:1]
    out = tmp_path / "out"
    score_slides(rows, root / "cls", out, cache_dir=root / "traincache")
    rec = json.loads((out / "score.json").read_text())
    assert rec["model"] == str((root / "cls").resolve()) and len(rec["model_sha256"]) == 64
    # another model would otherwise skip every slide as "already scored" and keep the first model's numbers
    with pytest.raises(CacheError, match="holds the predictions of another model"):
        score_slides(rows, root / "seg", out, cache_dir=root / "traincache")
    again = score_slides(rows, root / "cls", out, cache_dir=root / "traincache")
    assert again.skipped == [rows[0].slide_id] and not again.scored


def test_a_moved_run_scores_with_its_weights_given_again(runs, tmp_path):

    from safetensors.torch import save_file

    from xtpath.cache import read_settings
    from xtpath.errors import CheckpointError
    from xtpath.models.encoders import RegionEncoder, file_sha256

    root, csv_path = runs
    files = {}
    for seed in (1, 2):
        enc = RegionEncoder("test_convnext", input_px=64, seed=seed)
        files[seed] = tmp_path / f"w{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(files[seed]))
    run = tmp_path / "run"
    shutil.copytree(root / "cls", run)  # as if trained with --weights on another machine
    ex = json.loads((run / "extract.json").read_text())
    ex.update(weights="/gone/w.safetensors", weights_sha256=file_sha256(files[1]))
    (run / "extract.json").write_text(json.dumps(ex))
    rows = read_slides_csv(csv_path)[:1]
    with pytest.raises(CheckpointError, match=r"weights /gone/w.safetensors are not on this machine; pass --weights"):
        score_slides(rows, run, tmp_path / "a")
    with pytest.raises(CheckpointError, match="is not that of the weights the model was trained with"):
        score_slides(rows, run, tmp_path / "b", weights=files[2])
    done = score_slides(rows, run, tmp_path / "c", weights=files[1])
    assert done.scored == [rows[0].slide_id] and not done.failed
    stored = read_settings(tmp_path / "c" / "cache" / f"{rows[0].slide_id}.h5")
    assert stored["weights_sha256"] == file_sha256(files[1])


def test_extract_like_a_run_refuses_settings_of_its_own(runs, tmp_path):
    root, csv_path = runs
    r = _xtpath("extract", csv_path, "--like", root / "cls", "--encoder", "resnet18", "--out", tmp_path / "c")
    assert r.returncode == 1 and "takes the encoder and region settings from the run; drop --encoder" in r.stderr
    assert not (tmp_path / "c").exists()


def test_a_cache_of_another_slide_or_a_broken_one_fails_only_its_slide(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:3]
    cache = tmp_path / "cache"
    cache.mkdir()
    for r in rows:
        shutil.copy(root / "traincache" / f"{r.slide_id}.h5", cache)
    # the first slide_id's cache was made from the second slide's file (same size: only the bytes tell); the
    # third's is damaged
    shutil.copy(cache / f"{rows[1].slide_id}.h5", cache / f"{rows[0].slide_id}.h5")
    with open(cache / f"{rows[2].slide_id}.h5", "r+b") as f:
        f.truncate(3000)
    s = score_slides(rows, root / "cls", tmp_path / "out", cache_dir=cache)
    assert s.scored == [rows[1].slide_id]
    assert "when it had another size or content" in s.failed[rows[0].slide_id]
    assert "not a readable HDF5 file" in s.failed[rows[2].slide_id]
    assert not (tmp_path / "out" / rows[0].slide_id / "heatmap.png").exists()
    # extract names both problems at once, before any work
    with pytest.raises(CacheError) as e:
        extract_slides(rows, cache, ExtractConfig(**ENC, num_workers=0))
    lines = str(e.value).splitlines()
    assert any(rows[0].slide_id in ln and "when it had another size or content" in ln for ln in lines)
    assert any(rows[2].slide_id in ln and "not a readable HDF5 file" in ln for ln in lines)


def test_a_scored_slide_id_given_another_file_is_not_skipped_silently(runs, tmp_path):
    root, csv_path = runs
    rows = read_slides_csv(csv_path)[:2]
    out = tmp_path / "out"
    score_slides(rows, root / "cls", out, cache_dir=root / "traincache")
    # the same slides moved elsewhere: skipped as scored
    moved = tmp_path / "moved"
    moved.mkdir()
    for r in rows:
        shutil.copy(r.path, moved / Path(r.path).name)
    listing = tmp_path / "moved.csv"
    listing.write_text("slide_id,path\n" + "".join(f"{r.slide_id},{moved / Path(r.path).name}\n" for r in rows))
    s = score_slides(read_slides_csv(listing), root / "cls", out, cache_dir=root / "traincache")
    assert sorted(s.skipped) == sorted(r.slide_id for r in rows) and not s.scored
    # the first slide_id now names the second slide's file: refused before any work
    swapped = tmp_path / "swapped.csv"
    swapped.write_text(f"slide_id,path\n{rows[0].slide_id},{rows[1].path}\n")
    with pytest.raises(InvalidParameterError, match=rf"swapped.csv:2: {rows[0].slide_id} was scored from .* is "
                                                    r"another file\nscore them again with --rescore"):
        score_slides(read_slides_csv(swapped), root / "cls", out, cache_dir=root / "traincache")
    # --rescore scores it again; a shared cache made from the other file is refused for that slide, and the
    # slide's folder then holds only the failure (the earlier result's heatmap and regions went with its row)
    s = score_slides(read_slides_csv(swapped), root / "cls", out, cache_dir=root / "traincache", rescore=True)
    assert "when it had another size or content" in s.failed[rows[0].slide_id]
    assert [p["slide_id"] for p in _predictions(out)] == [rows[1].slide_id]
    assert sorted(p.name for p in (out / rows[0].slide_id).iterdir()) == ["prediction.json"]
    assert json.loads((out / rows[0].slide_id / "prediction.json").read_text())["status"] == "failed"
    # with the score's own cache (no --cache), --rescore extracts the new file again and scores it
    own = tmp_path / "own"
    score_slides(rows[:1], root / "cls", own)
    before = _predictions(own)[0]
    with pytest.raises(InvalidParameterError, match="score them again with --rescore"):
        score_slides(read_slides_csv(swapped), root / "cls", own)
    s = score_slides(read_slides_csv(swapped), root / "cls", own, rescore=True)
    assert s.scored == [rows[0].slide_id] and not s.failed
    after = _predictions(own)[0]
    other = next(p for p in _predictions(out) if p["slide_id"] == rows[1].slide_id)  # the file's own scores
    assert after["p_touch"] == other["p_touch"] and after["p_touch"] != before["p_touch"]
    rec = json.loads((own / rows[0].slide_id / "prediction.json").read_text())
    assert rec["slide_path"] == str(rows[1].path)


def test_a_run_on_adopted_caches_extracts_new_slides_the_same_way(runs, tmp_path):
    """Train on caches made elsewhere (tokens, min_tissue 0.6, edge drop, hilbert order): the run's extract.json
    holds that whole recipe, so score (no --cache) and extract --like build identical caches for new slides."""
    root, csv_path = runs
    rows = read_slides_csv(csv_path)
    made = ExtractConfig(**ENC, features="tokens", min_tissue=0.6, edge="drop", order="hilbert",
                         tissue_preset="biopsy", num_workers=0)
    extract_slides(rows, tmp_path / "own", made)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(csv_path, tmp_path / "run", load_config(None, {"device": "cpu", "epochs": 1, "context": "mean",
                                                             "cache": str(tmp_path / "own")}),
              show_progress=False, log=lambda m: None)
    rec = json.loads((tmp_path / "run" / "extract.json").read_text())
    assert {k: rec[k] for k in ("features", "min_tissue", "edge", "order", "tissue_preset", "encoder_px")} == \
        {"features": "tokens", "min_tissue": 0.6, "edge": "drop", "order": "hilbert", "tissue_preset": "biopsy",
         "encoder_px": 64}
    # score builds its own cache for a slide (none given): the same features as the adopted cache
    s = score_slides(rows[:1], tmp_path / "run", tmp_path / "out")
    assert s.scored == [rows[0].slide_id] and not s.failed
    a = load_features(tmp_path / "own" / f"{rows[0].slide_id}.h5")
    b = load_features(tmp_path / "out" / "cache" / f"{rows[0].slide_id}.h5")
    assert a.features.shape == b.features.shape and np.array_equal(a.coords, b.coords)
    assert np.allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32), atol=1e-3)
    # extract --like the run: the same
    r = _xtpath("extract", csv_path, "--out", tmp_path / "like", "--like", tmp_path / "run", "--only",
                rows[1].slide_id, "--workers", "0")
    assert r.returncode == 0, r.stderr
    c = load_features(tmp_path / "like" / f"{rows[1].slide_id}.h5")
    d = load_features(tmp_path / "own" / f"{rows[1].slide_id}.h5")
    assert np.array_equal(c.coords, d.coords) and c.settings["tissue"] == d.settings["tissue"]


def test_region_polygons_stop_at_the_slide_border(runs, tmp_path):
    """A real slide whose size is no multiple of the region: its padded edge regions are cut at the border in
    regions.geojson (QuPath), while regions.h5 keeps the regions' own coordinates."""
    root, _ = runs
    path = REAL_SLIDES["CMU-1-Small-Region.svs"]
    listing = tmp_path / "real.csv"
    listing.write_text(f"slide_id,path\ncmu,{path}\n")
    s = score_slides(read_slides_csv(listing), root / "cls", tmp_path / "out")
    assert s.scored == ["cmu"], s.failed
    W, H = open_slide(path).dimensions
    fc = json.loads((tmp_path / "out" / "cmu" / "regions.geojson").read_text())
    rings = [np.array(f["geometry"]["coordinates"][0]) for f in fc["features"]]
    with h5py.File(tmp_path / "out" / "cmu" / "regions.h5") as f:
        coords, size = f["coords"][:], float(f["coords"].attrs["patch_size_level0"])
    assert (W % size) and (H % size) and (coords + size > [W, H]).any()  # some regions reach past the slide
    for ring, (x, y) in zip(rings, coords):
        assert ring.min(0) == pytest.approx([x, y], abs=0.01)  # GeoJSON keeps 2 decimals
        assert ring.max(0) == pytest.approx([min(x + size, W), min(y + size, H)], abs=0.01)


def test_no_extract_scores_the_cache_and_fails_the_rest_with_their_reason(runs, tmp_path):
    """--no-extract (the cluster workflow's score step): nothing is decoded; a slide whose extraction failed
    fails with that reason, a slide never extracted says to run extract."""
    root, csv_path = runs
    good = read_slides_csv(csv_path)[:2]
    listing = tmp_path / "s.csv"
    listing.write_text("slide_id,path\n" + "".join(f"{r.slide_id},{r.path}\n" for r in good)
                       + f"broken,{CORRUPT_SLIDE}\n")
    rows = read_slides_csv(listing)
    cache = tmp_path / "cache"
    ex = extract_slides([rows[0], rows[2]], cache, ExtractConfig(**ENC, num_workers=0))
    assert "broken" in ex.failed
    events = []
    s = score_slides(rows, root / "cls", tmp_path / "out", cache_dir=cache, no_extract=True,
                     progress=lambda e, d: events.append(e))
    assert s.scored == [rows[0].slide_id]
    assert s.failed["broken"] == ex.failed["broken"] and "cannot decode" in s.failed["broken"]
    assert s.failed[rows[1].slide_id].startswith(f"no feature cache {cache / (rows[1].slide_id + '.h5')}; run "
                                                 "xtpath extract first")
    assert not any(e.startswith("extract_") for e in events)
    assert sorted(p.name for p in cache.glob("*.h5")) == [f"{rows[0].slide_id}.h5"]  # nothing was extracted
    with open(tmp_path / "out" / "failures.csv") as f:
        assert sorted(r["slide_id"] for r in csv.DictReader(f)) == sorted(["broken", rows[1].slide_id])
