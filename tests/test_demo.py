"""The offline demo, smaller: generated slides -> features -> Mamba and mean -> scores and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xtpath.demo_data import DemoSpec, make_demo_dataset
from xtpath.io import open_slide, read_slides_csv
from xtpath.io.geojson import read_annotations


def test_demo_dataset_is_deterministic_and_labelled_by_arrangement(tmp_path):
    a = make_demo_dataset(tmp_path / "a", DemoSpec(n_slides=6, grid=6, seed=4))
    b = make_demo_dataset(tmp_path / "b", DemoSpec(n_slides=6, grid=6, seed=4))
    rows = read_slides_csv(a)
    assert [r.label for r in rows] == ["touch", "apart"] * 3
    assert {r.split for r in rows} <= {"train", "val", "test"}
    for ra, rb in zip(rows, read_slides_csv(b)):
        assert ra.path.read_bytes() == (Path(b).parent / "slides" / ra.path.name).read_bytes()
    for r in rows:
        s = open_slide(r.path)
        assert s.dimensions == (6 * 256, 6 * 256) and s.mpp == pytest.approx((0.5, 0.5)) and s.level_count >= 2
        ann = read_annotations(r.mask)
        kinds = {name for name, _ in ann}
        assert kinds == {"dense", "pink"}
        # the label is the arrangement: do cells of the two kinds share an edge?
        cells = {k: set() for k in kinds}
        for name, rings in ann:
            ext = np.asarray(rings[0])
            for x in range(0, 6 * 256, 256):
                for y in range(0, 6 * 256, 256):
                    from shapely.geometry import Point, Polygon

                    if Polygon(rings[0], rings[1:]).contains(Point(x + 128, y + 128)):
                        cells[name].add((y // 256, x // 256))
            assert ext.min() >= 0
        touch = any((r_ + dr, c_ + dc) in cells["pink"] for r_, c_ in cells["dense"]
                    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
        assert touch == (r.label == "touch"), r.slide_id


@pytest.mark.slow
def test_small_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "xtpath", "demo", "--out", str(tmp_path / "demo"), "--n-slides", "30",
                        "--grid", "8", "--epochs", "12"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    m_acc, m_auc = (float(v) for v in next(ln for ln in lines if "xT Mamba" in ln).split()[2:4])
    b_acc, b_auc = (float(v) for v in next(ln for ln in lines if "mean pooling" in ln).split()[2:4])
    # 18 training slides: Mamba ranks the held-out slides well; mean pooling cannot see the arrangement
    assert m_auc >= 0.9 and m_auc > b_auc and m_acc > b_acc, r.stdout
    out = tmp_path / "demo"
    for ctx in ("mamba", "mean"):
        rep = json.loads((out / f"scored_{ctx}" / "report" / "report.json").read_text())
        assert rep["n_scored"] == rep["n_labelled"] == 6
        assert (out / f"run_{ctx}" / "model.safetensors").exists()
    preds = (out / "scored_mamba" / "predictions.csv").read_text().splitlines()
    sid = preds[1].split(",")[0]
    assert (out / "scored_mamba" / sid / "heatmap.png").exists()
    assert json.loads((out / "scored_mamba" / sid / "regions.geojson").read_text())["features"]


def test_demo_checks_its_settings_before_writing_anything(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, msg in ((["--epochs", "0"], "error: epochs=0 must be at least 1"),
                      (["--n-slides", "2"], "error: --n-slides 2: use at least 4 (two per label)"),
                      (["--grid", "3"], "error: --grid 3: use at least 5 cells per side")):
        r = subprocess.run([sys.executable, "-m", "xtpath", "demo", "--out", str(tmp_path / "demo"), *args],
                           capture_output=True, text=True, env=env, timeout=300, check=False)
        assert r.returncode == 1 and r.stderr.strip() == msg, r.stderr  # no "[1/4] writing ..." line first
        assert not (tmp_path / "demo").exists()
