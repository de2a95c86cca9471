"""The command line, run as a real subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from .conftest import DATA


def xtpath(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "xtpath", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_help_lists_commands_and_is_light():
    r = xtpath("--help")
    assert r.returncode == 0
    for cmd in ("info", "tissue", "tile"):
        assert cmd in r.stdout
    # --help must not import the heavy libraries
    code = ("import sys; from xtpath.cli import app; "
            "heavy = [m for m in ('torch', 'openslide', 'skimage', 'h5py', 'timm', 'tiffslide') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == ""


def test_info_json():
    r = xtpath("info", DATA / "test3-TRITC-2-560.ndpi", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["backend"] == "openslide" and d["vendor"] == "hamamatsu"
    assert d["dimensions"] == [3968, 4864] and d["level_count"] == 7
    assert d["mpp"] == pytest.approx([0.22818, 0.22818], abs=1e-4)
    assert d["mpp_source"] == "TIFF resolution tags" and d["objective_power"] == 40


def test_info_table_shows_mpp_source_and_grid_scale():
    r = xtpath("info", DATA / "tcga-cr-7395-01a-01-ts1.svs")
    assert r.returncode == 0
    assert "unknown (pass --mpp)" in r.stdout and "pixel grid scale 2" in r.stdout


def test_tissue_writes_three_files(tmp_path):
    r = xtpath("tissue", DATA / "CMU-1-Small-Region.svs", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    area = float(r.stdout.split("tissue area ")[1].split(" mm²")[0])
    assert 0.45 < area < 0.65
    for suffix in ("_tissue.png", "_qc.png", "_tissue.geojson"):
        assert (tmp_path / f"CMU-1-Small-Region{suffix}").stat().st_size > 0
    fc = json.loads((tmp_path / "CMU-1-Small-Region_tissue.geojson").read_text())
    assert fc["features"] and fc["features"][0]["properties"]["classification"]["name"] == "Tissue"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "CMU-1-Small-Region_tissue.png"))
    qc = Image.open(tmp_path / "CMU-1-Small-Region_qc.png")
    # the mask is small (a few µm per pixel); its QC picture is blown up by whole pixels to be looked at
    k = qc.size[0] // mask.shape[1]
    assert k == 512 // max(mask.shape) >= 2 and qc.size == (mask.shape[1] * k, mask.shape[0] * k)


def test_tile_h5_and_csv(tmp_path):
    r = xtpath("tile", DATA / "CMU-1-Small-Region.svs", "--target-mpp", "0.5", "--region-px", "256",
               "--out", tmp_path / "c.h5")
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split(": ")[1].split(" regions")[0])
    assert n > 10
    with h5py.File(tmp_path / "c.h5") as f:
        coords = f["coords"][:]
        assert coords.shape == (n, 2) and coords.dtype == np.int64
        a = f["coords"].attrs
        assert a["patch_size"] == 256 and a["patch_size_level0"] == 257  # 256 * 0.5 / 0.499
        assert a["level0_width"] == 2220 and a["level0_height"] == 2967 and a["name"] == "CMU-1-Small-Region"
        assert np.array_equal(np.rint(f["grid"][:] * 256.513).astype(int)[:, ::-1], coords)
    xtpath("tile", DATA / "CMU-1-Small-Region.svs", "--target-mpp", "0.5", "--region-px", "256",
                "--order", "hilbert", "--out", tmp_path / "c.csv")
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[0] == "x,y,row,col,tissue" and len(rows) == n + 1
    assert sorted(rows[1:]) != rows[1:] or n < 3  # hilbert order differs from raster


@pytest.mark.parametrize("args,needle", [
    (["info", "no-such-slide.svs"], "no-such-slide.svs: no such file"),
    (["tissue", DATA / "tcga-cr-7395-01a-01-ts1.svs", "--out", "x"], "--mpp"),
    (["tissue", DATA / "openslide-python-unreadable.svs", "--out", "x"], "cannot decode the region"),
    (["tile", DATA / "CMU-1-Small-Region.svs", "--target-mpp", "0.5", "--region-px", "64", "--out", "x.txt"],
     "use a .h5 or .csv"),
])
def test_errors_are_one_line_with_status_1(tmp_path, args, needle):
    r = xtpath(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_extract_refuses_bad_settings_before_any_warning_or_folder(tmp_path):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(f"slide_id,path\ncmu,{DATA / 'CMU-1-Small-Region.svs'}\n")
    for opt, value, msg in (("--batch-size", "0", "--batch-size 0: must be at least 1"),
                            ("--workers", "-1", "--workers -1: must be 0 (read in this process) or more"),
                            ("--target-mpp", "0", "--target-mpp 0.0: must be positive"),
                            ("--target-mpp", "inf", "--target-mpp inf: must be positive"),
                            ("--min-tissue", "25", ("--min-tissue 25: must be a fraction between 0 and 1, e.g. 0.25 "
                                                    "(25 % is 0.25)")),
                            ("--min-tissue", "-0.1", "--min-tissue -0.1: must be a fraction between 0 and 1")):
        r = xtpath("extract", csv_path, "--out", tmp_path / "out", "--encoder", "test_convnext", opt, value)
        assert r.returncode == 1 and r.stderr.startswith(f"error: {msg}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1  # not after the random-weights warning
        assert not (tmp_path / "out").exists()


def test_usage_error_exit_code():
    r = xtpath("tile", DATA / "CMU-1-Small-Region.svs", "--target-mpp", "0.5")
    assert r.returncode == 2 and "--region-px" in r.stderr


def test_a_file_where_a_folder_belongs_is_one_line_not_a_traceback(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder\n")
    r = xtpath("demo-data", str(blocker / "data"), "--n-slides", "4", "--grid", "5")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {blocker}") and "choose another output folder" in lines[0]


def test_tile_refuses_a_target_mpp_far_finer_than_the_slide(tmp_path):
    r = xtpath("tile", str(DATA / "dicom-camelyon-jpeg"), "--target-mpp", "0.5", "--region-px", "256")
    assert r.returncode == 1
    assert "level 0 is 28.97 µm/px, 57.9x coarser than --target-mpp 0.5" in r.stderr
    assert "about 4 real pixels blown up to 256" in r.stderr
    ok = xtpath("tile", str(DATA / "dicom-camelyon-jpeg"), "--target-mpp", "16", "--region-px", "64", "--no-tissue")
    assert ok.returncode == 0, ok.stderr


def test_empty_and_truncated_files_are_one_line_each(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.svs"
    cut.write_bytes((DATA / "CMU-1-Small-Region.svs").read_bytes()[:100_000])  # an interrupted copy
    r = xtpath("info", str(empty))
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {empty}: empty file (0 bytes); the copy or download "
                                                      "did not finish, copy it again")
    r = xtpath("info", str(cut))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {cut}: not a slide"), r.stderr
    assert lines[0].endswith("check that the file is whole (a copy cut short reads like this) and a slide format "
                             "(SVS, NDPI, TIFF, OME-TIFF, DICOM, MRXS, ...)")


def test_a_stopped_train_says_whether_anything_was_kept(tmp_path, capsys):
    from xtpath.cli import _stopped

    (tmp_path / "run").mkdir()
    cases = [(["train", "s.csv", "--out", str(tmp_path / "never")], False, 130,
              "interrupted before the first epoch finished: nothing was kept; run the same command again"),
             (["train", "s.csv", f"--out={tmp_path / 'never'}"], True, 143,
              "terminated before the first epoch finished: nothing was kept; run the same command again"),
             (["train", "s.csv", "-o", str(tmp_path / "run")], False, 130,
              "interrupted: what was finished is kept; add --resume to the same command to resume"),
             (["score", "s.csv", "--out", str(tmp_path / "never")], True, 143,
              "terminated: what was finished is kept; run the same command again to resume")]
    for argv, terminated, code, said in cases:
        with pytest.raises(SystemExit) as e:
            _stopped(argv, terminated)
        assert e.value.code == code and capsys.readouterr().err.strip() == said
