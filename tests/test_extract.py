"""`xtpath extract`: real slides, real HDF5 files, real worker processes and real CLI subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import h5py
import numpy as np
import pytest
import timm
import torch

from xtpath.cache import load_features, read_settings
from xtpath.errors import CacheError, XtpathError
from xtpath.extract import ExtractConfig, extract_slides, run_device_workers
from xtpath.io import open_slide, read_slides_csv
from xtpath.io.tiffwriter import write_pyramid_tiff
from xtpath.models.encoders import RegionEncoder

from .conftest import CORRUPT_SLIDE, DATA

ENC = dict(encoder="test_convnext", encoder_px=64, region_px=128, target_mpp=1.0, batch_size=8, num_workers=1)


def _csv(tmp_path, rows, name="slides.csv"):
    lines = ["slide_id,path,mpp"] + [f"{sid},{path},{mpp if mpp else ''}" for sid, path, mpp in rows]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "xtpath", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Three real slides and a corrupt one in the middle of the batch."""
    tmp = tmp_path_factory.mktemp("extract")
    csv = _csv(tmp, [("cmu", DATA / "CMU-1-Small-Region.svs", None), ("bad", CORRUPT_SLIDE, None),
                     ("tcga", DATA / "tcga-cr-7395-01a-01-ts1.svs", 0.5), ("os2", DATA / "OS-2-ndpi.ome.tif", None)])
    cfg = ExtractConfig(**ENC)
    summary = extract_slides(read_slides_csv(csv), tmp / "cache", cfg)
    return tmp, csv, cfg, summary


def test_layout_and_failure_in_the_middle(extracted):
    tmp, _, _, summary = extracted
    assert sorted(summary.done) == ["cmu", "os2", "tcga"]
    assert list(summary.failed) == ["bad"] and "cannot decode" in summary.failed["bad"]
    lines = (tmp / "cache" / "failures.csv").read_text().splitlines()
    assert lines[0] == "slide_id,path,error,message,time" and len(lines) == 2
    assert lines[1].startswith(f"bad,{CORRUPT_SLIDE},CorruptRegionError,")
    assert sorted(p.name for p in (tmp / "cache").glob("*.h5")) == ["cmu.h5", "os2.h5", "tcga.h5"]
    with h5py.File(tmp / "cache" / "tcga.h5") as f:
        n = f["coords"].shape[0]
        assert f["features"].shape == (n, 64) and f["features"].dtype == np.float32
        assert f["grid"].shape == (n, 2) and f["tissue"].shape == (n,)
        a = f["coords"].attrs
        assert a["patch_size"] == 128 and a["patch_size_level0"] == 256  # 128 px at 1.0 on a 0.5 µm/px slide
        assert a["level0_width"] == 4443 and a["level0_height"] == 3567 and a["name"] == "tcga"
        assert f.attrs["encoder"] == "test_convnext" and f.attrs["weights_sha256"] == "random-init:seed=0"
        assert f.attrs["target_mpp"] == 1.0 and f.attrs["region_px"] == 128 and f.attrs["schema_version"] == 1
        assert list(f.attrs["mpp"]) == [0.5, 0.5]
        # the normalisation used, from the encoder's timm config
        want = timm.data.resolve_data_config({}, model=timm.create_model("test_convnext", pretrained=False))
        assert np.allclose(f.attrs["normalize_mean"], want["mean"]) and np.allclose(f.attrs["normalize_std"], want["std"])
        assert json.loads(f.attrs["config"])["tissue"]["min_tissue"] == 0.25
        assert (f["tissue"][:] >= 0.25).all()


@pytest.mark.parametrize("sid,path,mpp", [("cmu", DATA / "CMU-1-Small-Region.svs", None),
                                          ("tcga", DATA / "tcga-cr-7395-01a-01-ts1.svs", 0.5)])
def test_features_equal_the_encoder_on_the_region_read_directly(extracted, sid, path, mpp):
    tmp, _, cfg, _ = extracted
    sf = load_features(tmp / "cache" / f"{sid}.h5")
    slide = open_slide(path, mpp=mpp)
    enc = RegionEncoder(cfg.encoder, input_px=cfg.encoder_px).eval()
    size = sf.settings["region_size_level0"][0]
    rng = np.random.default_rng(0)
    for i in rng.choice(len(sf), size=min(5, len(sf)), replace=False):
        r, c = sf.grid[i]
        assert tuple(sf.coords[i]) == (round(c * size), round(r * size))
        pixels = slide.read_region((c * size, r * size), (128, 128), mpp=1.0)
        with torch.inference_mode():
            direct = enc(torch.from_numpy(pixels)[None])[0].numpy()
        np.testing.assert_allclose(sf.features[i], direct, rtol=1e-4, atol=1e-5)


def test_resume_skips_matching_caches(extracted):
    tmp, csv, cfg, _ = extracted
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("*.h5")}
    again = extract_slides(read_slides_csv(csv), tmp / "cache", cfg)
    assert sorted(again.skipped) == ["cmu", "os2", "tcga"] and again.done == []
    assert list(again.failed) == ["bad"]  # failures are retried, and fail again
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("*.h5")}
    # another region order or feature dtype does not make a cache stale: kept, and said
    other = ExtractConfig(**{**cfg.__dict__, "order": "hilbert", "dtype": "float16"})
    with pytest.warns(UserWarning, match=r"^3 slide\(s\) already cached are kept as they were made \(\w+ has order "
                                         r"raster \(asked hilbert\), dtype float32 \(asked float16\), \.\.\.\): "
                                         r"the region order and the feature dtype do not make a cache stale; pass "
                                         r"--overwrite to make them again$"):
        again = extract_slides(read_slides_csv(csv), tmp / "cache", other)
    assert sorted(again.skipped) == ["cmu", "os2", "tcga"]
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp / "cache").glob("*.h5")}


def test_other_settings_are_an_error_unless_overwrite(extracted, tmp_path):
    tmp, csv, cfg, _ = extracted
    cache = tmp_path / "cache"
    rows = read_slides_csv(csv)[:1]
    extract_slides(rows, cache, cfg)
    before = (cache / "cmu.h5").stat().st_mtime_ns
    other = ExtractConfig(**{**ENC, "target_mpp": 2.0})
    with pytest.raises(CacheError) as e:
        extract_slides(rows, cache, other)
    assert "cmu.h5: made with other settings (target_mpp: 1.0 -> 2.0)" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert (cache / "cmu.h5").stat().st_mtime_ns == before
    other.overwrite = True
    redo = extract_slides(rows, cache, other)
    assert redo.done == ["cmu"] and read_settings(cache / "cmu.h5")["target_mpp"] == 2.0


def test_a_fixed_slide_leaves_the_failures_file(tmp_path):
    cache = tmp_path / "cache"
    bad = _csv(tmp_path, [("s", CORRUPT_SLIDE, None)])
    assert list(extract_slides(read_slides_csv(bad), cache, ExtractConfig(**ENC)).failed) == ["s"]
    good = _csv(tmp_path, [("s", DATA / "CMU-1-Small-Region.svs", None)], "good.csv")
    assert extract_slides(read_slides_csv(good), cache, ExtractConfig(**ENC)).done == ["s"]
    assert (cache / "failures.csv").read_text().splitlines() == ["slide_id,path,error,message,time"]


def test_token_grids_of_2x2_subregions(tmp_path):
    csv = _csv(tmp_path, [("cmu", DATA / "CMU-1-Small-Region.svs", None)])
    cfg = ExtractConfig(**{**ENC, "features": "tokens"})
    extract_slides(read_slides_csv(csv), tmp_path / "c", cfg)
    sf = load_features(tmp_path / "c" / "cmu.h5")
    assert sf.features.shape[1:] == (4, 4, 64) and sf.features.dtype == np.float16  # 2x2 inputs of 2x2 tokens
    assert sf.settings["features_kind"] == "tokens" and sf.settings["token_grid"] == [2, 2]
    slide = open_slide(DATA / "CMU-1-Small-Region.svs")
    enc = RegionEncoder("test_convnext", features="tokens", input_px=64).eval()
    size = sf.settings["region_size_level0"][0]
    r, c = sf.grid[3]
    with torch.inference_mode():
        direct = enc(torch.from_numpy(slide.read_region((c * size, r * size), (128, 128), mpp=1.0))[None])[0]
    np.testing.assert_allclose(sf.features[3].astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)


def test_synthetic_pyramid_and_no_tissue(tmp_path):
    """Textured 200-µm blocks at known places on a 0.5 µm/px pyramid: every block's regions are kept."""
    rng = np.random.default_rng(0)
    img = np.full((3000, 4000, 3), 242, np.uint8)
    blocks = [(300, 200), (2100, 900), (3300, 2400)]  # level-0 (x, y) of 400-px blocks
    for x, y in blocks:
        img[y:y + 400, x:x + 400] = np.clip(rng.normal([190, 100, 160], 20, (400, 400, 3)), 0, 255)
    slide, blank = tmp_path / "blocks.tif", tmp_path / "blank.tif"
    write_pyramid_tiff(slide, img, 0.5)
    write_pyramid_tiff(blank, np.full((900, 900, 3), 240, np.uint8), 0.5)
    csv = _csv(tmp_path, [("blocks", slide, None), ("blank", blank, None)])
    s = extract_slides(read_slides_csv(csv), tmp_path / "c", ExtractConfig(**{**ENC, "min_tissue": 0.5}))
    assert s.done == ["blocks"] and "no region has at least 50% tissue" in s.failed["blank"]
    sf = load_features(tmp_path / "c" / "blocks.h5")
    size = sf.settings["region_size_level0"][0]
    assert size == 256.0  # 128 px at 1.0 µm/px on a 0.5 µm/px slide
    expected = set()
    for x, y in blocks:  # regions whose area is at least half inside a block
        for r in range(int(y // size), int((y + 400) // size) + 1):
            for c in range(int(x // size), int((x + 400) // size) + 1):
                ox = max(0.0, min(x + 400, (c + 1) * size) - max(x, c * size))
                oy = max(0.0, min(y + 400, (r + 1) * size) - max(y, r * size))
                if ox * oy >= 0.5 * size * size:
                    expected.add((r, c))
    assert {tuple(g) for g in sf.grid} == expected


def test_several_device_processes(tmp_path):
    """The multi-device path (one process per device) on two CPU processes: each slide done exactly once."""
    csv = _csv(tmp_path, [("a", DATA / "CMU-1-Small-Region.svs", None),
                          ("b", DATA / "OS-2-ndpi.ome.tif", None),
                          ("c", DATA / "tcga-cr-7395-01a-01-ts1.svs", 0.5)])
    events = []
    s = extract_slides(read_slides_csv(csv), tmp_path / "c", ExtractConfig(**{**ENC, "num_workers": 0}),
                       devices=["cpu", "cpu"], progress=lambda e, d: events.append((e, d)))
    assert sorted(s.done) == ["a", "b", "c"] and not s.failed
    assert sorted(d["slide_id"] for e, d in events if e == "slide_done") == ["a", "b", "c"]


def _worker_that_dies(rank, queue):
    """A device worker for run_device_workers: rank 0 reports and finishes, rank 1 dies at once."""
    if rank == 0:
        queue.put(("slide_done", {"slide_id": "x"}))
        queue.put(("summary", {"rank": 0}))
    else:
        os._exit(7)


def test_device_workers_relay_progress_and_a_dead_worker_is_an_error_not_a_hang():
    events = []
    assert run_device_workers(_worker_that_dies, [(0,)], lambda e, d: events.append((e, d))) == [{"rank": 0}]
    assert events == [("slide_done", {"slide_id": "x"})]
    with pytest.raises(XtpathError, match=r"device worker 1 \(of 2\) died with exit status 7"):
        run_device_workers(_worker_that_dies, [(0,), (1,)], lambda e, d: None)


@pytest.mark.slow
def test_kill_during_writing_leaves_no_h5_and_resume_finishes(tmp_path):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal([200, 110, 170], 20, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    big = tmp_path / "big.tif"
    write_pyramid_tiff(big, img, 0.5)
    csv = _csv(tmp_path, [("big", big, None)])
    cache = tmp_path / "cache"
    args = ["extract", csv, "--out", cache, "--encoder", "test_convnext", "--encoder-px", "64", "--region-px", "64",
            "--target-mpp", "0.5", "--batch-size", "4", "--workers", "1", "--devices", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xtpath", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob(".big.h5.*.tmp")):
        time.sleep(0.05)
    assert list(cache.glob(".big.h5.*.tmp")), "extraction never started writing"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / "big.h5").exists()
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    assert load_features(cache / "big.h5").features.shape == (1024, 64)
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))
    # SIGTERM (a cluster's time limit) and Ctrl-C unwind: the temporary file and the slide's lock are removed
    for sig, status, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        again = tmp_path / f"cache_{word}"
        run_args = [str(again) if a == cache else a for a in args]
        proc = subprocess.Popen([sys.executable, "-m", "xtpath", *map(str, run_args)], env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not list(again.glob(".big.h5.*.tmp")):
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == status, err[-2000:]
        assert err.strip().splitlines()[-1] == f"{word}: what was finished is kept; run the same command again " \
            "to resume"
        assert not list(again.glob(".*.tmp")) and not list((again / ".locks").glob("*"))
        assert not (again / "big.h5").exists()


def test_a_stop_whose_interrupt_was_lost_still_stops_the_extraction(tmp_path):
    # The command line's signal handler records the stop and raises KeyboardInterrupt, which Python drops (prints
    # "Exception ignored") when it lands in a finaliser run by garbage collection. Here the stop is recorded in
    # the middle of a slide with no interrupt at all: the batch loop must still stop and unwind.
    from xtpath.stop import clear_stop, request_stop

    rows = read_slides_csv(_csv(tmp_path, [("cmu", DATA / "CMU-1-Small-Region.svs", None)]))
    cache = tmp_path / "cache"
    seen = []

    def progress(event, data):
        if event == "regions":
            seen.append(data["n"])
            if len(seen) == 1:
                request_stop(signal.SIGTERM)

    cfg = ExtractConfig(**{**ENC, "batch_size": 2, "num_workers": 0})
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_slides(rows, cache, cfg, progress=progress)
    finally:
        clear_stop()
    assert seen == [2]  # stopped at the next batch
    assert not list(cache.glob("*.h5")) and not list(cache.glob(".*.tmp")) and not list((cache / ".locks").glob("*"))
    assert extract_slides(rows, cache, cfg).done == ["cmu"]


@pytest.mark.slow
def test_two_processes_share_a_csv_and_cache(tmp_path):
    rows = [(f"s{i}", DATA / name, mpp) for i, (name, mpp) in enumerate(
        [("CMU-1-Small-Region.svs", None), ("OS-2-ndpi.ome.tif", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.5),
         ("OS-1-detail.ome.tif", None), ("test3-TRITC-2-560.ndpi", None)])]
    csv = _csv(tmp_path, rows)
    args = ["extract", csv, "--out", tmp_path / "cache", "--encoder", "test_convnext", "--encoder-px", "64",
            "--region-px", "64", "--target-mpp", "1.0", "--workers", "0", "--devices", "cpu", "--min-tissue", "0.1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "xtpath", *map(str, args)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    extracted = [int(out.strip().splitlines()[-1].split(" extracted")[0]) for out, _ in outs]
    assert sum(extracted) == 5  # no slide was done twice
    for sid, _, _ in rows:
        assert len(load_features(tmp_path / "cache" / f"{sid}.h5")) > 0
    assert not list((tmp_path / "cache" / ".locks").iterdir())


def test_cli_extract_reports_bad_csv_rows(tmp_path):
    p = tmp_path / "slides.csv"
    p.write_text(f"slide_id,path\nA,{DATA / 'CMU-1-Small-Region.svs'}\nA,missing.svs\n")
    r = _run("extract", p, "--out", tmp_path / "c", "--encoder", "test_convnext", "--devices", "cpu")
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: slides.csv:3: slide_id 'A' is already used on line 2"]
    assert not (tmp_path / "c").exists()


def test_a_missing_slide_is_a_failed_slide_and_only_the_selected_rows_are_checked(tmp_path):
    # one job per slide on a cluster (--only): a bad row elsewhere in the CSV must not fail every job
    p = tmp_path / "slides.csv"
    p.write_text(f"slide_id,path,mpp\na,{DATA / 'CMU-1-Small-Region.svs'},\nb,missing.svs,\n"
                 f"c,{DATA / 'CMU-1-Small-Region.svs'},abc\n")
    args = ["extract", p, "--out", tmp_path / "c", "--encoder", "test_convnext", "--encoder-px", "64", "--devices",
            "cpu"]
    r = _run(*args)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "error: slides.csv:4: mpp 'abc' is not a positive number of microns per pixel"]
    r = _run(*args, "--only", "a", "--only", "b")
    assert r.returncode == 3, r.stderr
    assert len(load_features(tmp_path / "c" / "a.h5")) > 0
    failures = (tmp_path / "c" / "failures.csv").read_text().splitlines()
    assert len(failures) == 2 and failures[1].startswith(f"b,{tmp_path / 'missing.svs'},SlideNotFoundError,")
    assert "no such file" in failures[1]


def test_weights_that_do_not_fit_stop_the_run_once_not_per_slide(tmp_path):
    from safetensors.torch import save_file

    from xtpath.errors import CheckpointError

    vit = RegionEncoder("test_vit", input_px=64)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(path))
    csv = _csv(tmp_path, [("a", DATA / "CMU-1-Small-Region.svs", None), ("b", DATA / "OS-1-detail.ome.tif", None)])
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="vit.safetensors: weights do not fit encoder 'test_convnext'"):
        extract_slides(read_slides_csv(csv), cache, ExtractConfig(**{**ENC, "num_workers": 0}, weights=str(path)))
    assert not (cache / "failures.csv").exists() and not list(cache.glob("*.h5"))
    with pytest.raises(XtpathError, match="vit.safetensors: weights do not fit encoder"):  # from a device worker
        extract_slides(read_slides_csv(csv), cache, ExtractConfig(**{**ENC, "num_workers": 0}, weights=str(path)),
                       devices=["cpu", "cpu"])
    r = _run("extract", csv, "--out", tmp_path / "c2", "--encoder", "test_convnext", "--weights",
             tmp_path / "missing.safetensors")
    assert r.returncode == 1 and "error: --weights" in r.stderr and "missing.safetensors: no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_slide_far_coarser_than_the_target_mpp_fails_with_the_reason(tmp_path):
    csv = _csv(tmp_path, [("thumb", DATA / "dicom-camelyon-jpeg", None), ("cmu", DATA / "CMU-1-Small-Region.svs", None)])
    cache = tmp_path / "cache"
    summary = extract_slides(read_slides_csv(csv), cache, ExtractConfig(**{**ENC, "num_workers": 0}))
    assert summary.done == ["cmu"] and list(summary.failed) == ["thumb"]
    assert "28.97 µm/px, 29x coarser than --target-mpp 1" in summary.failed["thumb"]
    assert "thumb" in (cache / "failures.csv").read_text()


def test_reading_finer_than_level_0_is_said_once_per_run(tmp_path):
    rng = np.random.default_rng(1)
    img = np.full((600, 600, 3), 242, np.uint8)  # a block of tissue on glass
    img[100:500, 100:500] = np.clip(rng.normal([190, 100, 160], 20, (400, 400, 3)), 0, 255)
    write_pyramid_tiff(tmp_path / "a.tif", img, 1.0)  # 1 µm/px slides read at 0.5 µm/px: upsampled 2x
    write_pyramid_tiff(tmp_path / "b.tif", img, 1.0)
    write_pyramid_tiff(tmp_path / "c.tif", img, 0.5)  # at its level 0: nothing to say
    cfg = ExtractConfig(**{**ENC, "target_mpp": 0.5, "region_px": 64, "num_workers": 0})
    for rows, said in (([("c", tmp_path / "c.tif", None)], 0),
                       ([("a", tmp_path / "a.tif", None), ("b", tmp_path / "b.tif", None)], 1)):
        csv = _csv(tmp_path, rows, name=f"{rows[0][0]}.csv")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = extract_slides(read_slides_csv(csv), tmp_path / "cache", cfg)
        assert s.done == [r[0] for r in rows]
        up = [str(w.message) for w in caught if "finer than the slide's level 0" in str(w.message)]
        assert len(up) == said, up
    assert up[0].startswith(f"{tmp_path / 'a.tif'}: regions are read at 0.5 µm/px, finer than the slide's level 0 "
                            "(1 µm/px), so the encoder sees its pixels blown up 2x (said for the first such slide "
                            "only)")


def test_cli_extract_with_a_timm_model_folder(tmp_path):
    from .test_encoders import _model_folder

    _model_folder(tmp_path / "vit", img_size=64, init_values=1e-5)
    img = np.full((600, 600, 3), 242, np.uint8)
    img[100:500, 100:500] = np.clip(np.random.default_rng(2).normal([190, 100, 160], 20, (400, 400, 3)), 0, 255)
    write_pyramid_tiff(tmp_path / "s.tif", img, 1.0)
    csv = _csv(tmp_path, [("s", tmp_path / "s.tif", None)])
    r = _run("extract", csv, "--out", tmp_path / "c", "--encoder", f"local-dir:{tmp_path / 'vit'}", "--region-px", 64,
             "--target-mpp", 1.0, "--devices", "cpu", "--workers", 0)
    assert r.returncode == 0, r.stderr
    assert "randomly initialised" not in r.stderr  # the folder's weights were used
    with h5py.File(tmp_path / "c" / "s.h5") as f:
        assert f.attrs["encoder"] == f"local-dir:{(tmp_path / 'vit').resolve()}"
        assert f.attrs["weights_sha256"] == hashlib.sha256((tmp_path / "vit" / "model.safetensors").read_bytes()).hexdigest()
        assert np.allclose(f.attrs["normalize_mean"], [0.1, 0.2, 0.3]) and f.attrs["encoder_px"] == 64
        assert f["features"].shape[1] == 64 and len(f["features"]) > 0


def test_regions_far_from_whole_encoder_inputs_are_warned_about():
    import warnings

    from xtpath.extract import _warn_read_resolution

    cfg = ExtractConfig(encoder="test_convnext", region_px=320, target_mpp=0.5)
    with pytest.warns(UserWarning, match=r"^regions of 320 px are read as 1x1 encoder inputs of 224 px, at 0.7143 "
                                         r"µm/px rather than --target-mpp 0.5; .* give --region-px 224 "):
        _warn_read_resolution(cfg, 224)
    with pytest.warns(UserWarning, match=r"^regions of 160 px are read as 1x1 encoder inputs of 224 px, at 0.3571 "):
        _warn_read_resolution(ExtractConfig(encoder="test_convnext", region_px=160, target_mpp=0.5), 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the defaults (and CLAM's/TRIDENT's practice): 256-px regions for a 224-px encoder, 14 % off, are quiet
        _warn_read_resolution(ExtractConfig(encoder="test_convnext", region_px=256, target_mpp=0.5), 224)
        _warn_read_resolution(ExtractConfig(encoder="test_convnext", region_px=448, target_mpp=0.5), 224)
        _warn_read_resolution(ExtractConfig(encoder="test_convnext", region_px=512, target_mpp=0.5), 256)


def test_backend_choice_a_damaged_jpeg_tile_is_a_failure_with_openslide(tmp_path):
    # a tile whose JPEG data ends early (an end-of-image marker a third of the way in), as a broken copy gives:
    # openslide reports it; tiffslide (auto's choice for .tif) decodes it as grey, which --backend avoids
    import tifffile

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal([200, 110, 170], 20, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    bad = write_pyramid_tiff(tmp_path / "bad.tif", img, 0.5)
    with tifffile.TiffFile(bad) as t:
        off, n = t.pages[0].dataoffsets[5], t.pages[0].databytecounts[5]  # level 0, tile row 1, column 1
    with open(bad, "r+b") as f:
        f.seek(off + n // 3)
        f.write(b"\xff\xd9" + b"\x00" * (n - n // 3 - 2))
    csv = _csv(tmp_path, [("bad", bad, None)])
    args = ["extract", csv, "--encoder", "test_convnext", "--encoder-px", "64", "--region-px", "128", "--target-mpp",
            "0.5", "--devices", "cpu", "--workers", "0"]
    r = _run(*args, "--out", tmp_path / "os", "--backend", "openslide")
    assert r.returncode == 3, r.stderr
    failure = (tmp_path / "os" / "failures.csv").read_text().splitlines()[1]
    assert failure.startswith("bad,") and "CorruptRegionError" in failure and "premature end" in failure
    assert not (tmp_path / "os" / "bad.h5").exists()
    r = _run(*args, "--out", tmp_path / "ts", "--backend", "tiffslide")
    assert r.returncode == 0, r.stderr  # the documented limitation: nothing tells
    assert len(load_features(tmp_path / "ts" / "bad.h5")) == 64
