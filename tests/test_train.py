"""`xtpath train`: real caches, real slides, real subprocesses (kill and resume, torchrun DDP)."""

from __future__ import annotations

import csv
import json
import os
import re
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
import torch
import yaml

from xtpath.demo_data import DemoSpec, make_demo_dataset
from xtpath.errors import CacheError, CheckpointError, InvalidParameterError, ManifestError
from xtpath.extract import ExtractConfig, extract_slides
from xtpath.io import read_slides_csv
from xtpath.train import TrainConfig, load_config, train

from .synthetic_caches import write_arrangement_dataset

SMALL = {"d_model": 32, "n_layers": 2}
ENC = dict(encoder="test_convnext", encoder_px=64, region_px=128, target_mpp=1.0)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _cfg(**kw) -> TrainConfig:
    base = {"device": "cpu", "epochs": 3, "accumulate": 2, "context_options": dict(SMALL), "lr": 3e-3,
            "warmup_epochs": 0.0}
    base.update(kw)
    return load_config(None, base)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """8 small demo slides (real H&E pixels) with their caches."""
    root = tmp_path_factory.mktemp("demo")
    csv_path = make_demo_dataset(root, DemoSpec(n_slides=8, grid=6, seed=3))
    extract_slides(read_slides_csv(csv_path), root / "cache", ExtractConfig(**ENC, num_workers=0))
    return root, csv_path


def test_training_on_real_slides_lowers_the_loss_and_writes_the_run(demo, tmp_path):
    root, csv_path = demo
    run = tmp_path / "run"
    cfg = _cfg(cache=str(root / "cache"), epochs=6, context="mamba", patience=100)
    report = train(csv_path, run, cfg, show_progress=False, log=lambda m: None)
    rows = _metrics(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    # the run folder: config, class map, encoder settings, best model, last checkpoint, report, plots
    assert json.loads((run / "classes.json").read_text()) == ["apart", "touch"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["context"] == "mamba" and saved["encoder"] == "test_convnext" and saved["epochs"] == 6
    assert json.loads((run / "extract.json").read_text())["encoder"] == "test_convnext"
    assert (run / "model.safetensors").stat().st_size > 0 and json.loads((run / "model.json").read_text())
    state = torch.load(run / "last" / "state.pt", weights_only=True)
    assert state["epoch"] == 5 and "optimizer" in state and "scheduler" in state
    rep = json.loads((run / "report.json").read_text())
    assert rep["evaluated_on"] == "test" and set(rep["metrics"]) >= {"accuracy", "balanced_accuracy", "auc", "f1"}
    assert report["metrics"]["accuracy"] == rep["metrics"]["accuracy"]
    from PIL import Image

    for png in ("loss.png", "confusion.png"):
        assert Image.open(run / png).size[0] > 100
    # 8 slides: the test part is one slide, a single class, so there is no ROC curve to draw
    assert rep["n_test"] == 1 and rep["metrics"]["auc"] is None and not (run / "roc.png").exists()
    preds = (run / "predictions.csv").read_text().splitlines()
    assert preds[0] == "slide_id,label,predicted,p_apart,p_touch" and len(preds) == 1 + rep["n_test"]
    p = np.array([[float(v) for v in line.split(",")[3:]] for line in preds[1:]])
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_mamba_learns_the_arrangement_that_mean_pooling_cannot(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 112, seed=5, rows=8, cols=8,
                                         split={"train": 64, "val": 16})
    acc = {}
    for ctx in ("mamba", "mean"):
        cfg = _cfg(cache=str(tmp_path / "cache"), epochs=10, context=ctx, accumulate=1, patience=100,
                   monitor="accuracy")
        rep = train(csv_path, tmp_path / ctx, cfg, show_progress=False, log=lambda m: None)
        acc[ctx] = rep["metrics"]["accuracy"]
    assert acc["mamba"] >= 0.8 and acc["mean"] <= 0.65, acc
    assert acc["mamba"] - acc["mean"] >= 0.25, acc


def _run_cli(*args, env_extra=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "xtpath", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900, **kw)


def _train_args(csv_path, run, cache, cfg_file, *extra):
    return ["train", csv_path, "--out", run, "--cache", cache, "--config", cfg_file, "--device", "cpu", *extra]


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 40, seed=1, split={"train": 30, "val": 5})
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"epochs": 5, "accumulate": 2, "lr": 3e-3, "context": "mamba",
                                        "context_options": {"d_model": 32, "n_layers": 2}, "patience": 100}))
    full = _run_cli(*_train_args(csv_path, tmp_path / "full", tmp_path / "cache", cfg_file))
    assert full.returncode == 0, full.stderr
    # start again and kill it during epoch 3
    run = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xtpath",
                             *map(str, _train_args(csv_path, run, tmp_path / "cache", cfg_file))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if (run / "metrics.csv").exists() and len(_metrics(run / "metrics.csv")) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_metrics(run / "metrics.csv"))
    assert 2 <= done_before < 5
    again = _run_cli(*_train_args(csv_path, run, tmp_path / "cache", cfg_file))
    assert again.returncode == 1 and "--resume" in again.stderr  # refuses to overwrite a run
    saved = (run / "config.yaml").read_text()
    other = _run_cli(*_train_args(csv_path, run, tmp_path / "cache", cfg_file, "--resume", "--context", "abmil",
                                  "--epochs", "7"))
    assert other.returncode == 1 and "settings differ from the run's config.yaml (context: 'mamba' -> 'abmil'; " \
        "epochs: 5 -> 7)" in other.stderr, other.stderr
    assert (run / "config.yaml").read_text() == saved
    # an option given on the command line contradicts the run even when it is the default value (epochs 20)
    default = _run_cli("train", csv_path, "--out", run, "--device", "cpu", "--resume", "--epochs", "20")
    assert default.returncode == 1 and "settings differ from the run's config.yaml (epochs: 5 -> 20) (the " \
        "learning-rate schedule is laid out over the run's epochs, so a run cannot be lengthened)" in \
        default.stderr, default.stderr
    # another slides CSV (a slide dropped, one moved from val to train) would mix the run's splits: refused
    lines = Path(csv_path).read_text().splitlines()
    val_row = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    moved_id = lines[val_row].split(",")[0]
    lines[val_row] = lines[val_row][: -len("val")] + "train"
    changed = tmp_path / "changed.csv"
    changed.write_text("\n".join(lines[:-1]) + "\n")
    splits_before = (run / "splits.csv").read_text()
    other = _run_cli("train", changed, "--out", run, "--device", "cpu", "--resume")
    assert other.returncode == 1, other.stderr
    assert f"--resume: the slides or their splits differ from {run / 'splits.csv'} (0 slides added; 1 removed; " \
        f"1 with another label or part; e.g. {moved_id}: " in other.stderr and "val -> " in other.stderr, other.stderr
    assert (run / "splits.csv").read_text() == splits_before
    # resumed without the config file: what is not given comes from the run's config.yaml
    resumed = _run_cli("train", csv_path, "--out", run, "--device", "cpu", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _metrics(tmp_path / "full" / "metrics.csv"), _metrics(run / "metrics.csv")
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        for k in ra:
            if k != "seconds":
                assert ra[k] == rb[k], (k, ra, rb)
    wa, wb = _safetensors(tmp_path / "full" / "model.safetensors"), _safetensors(run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 20, seed=2, split={"train": 16, "val": 2})
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({"epochs": 2, "accumulate": 2, "lr": 3e-3, "context": "mamba",
                                        "context_options": {"d_model": 32, "n_layers": 2}, "patience": 100}))
    single = _run_cli(*_train_args(csv_path, tmp_path / "one", tmp_path / "cache", cfg_file))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = str(29500 + os.getpid() % 1000)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", port, "-m", "xtpath",
                          *map(str, _train_args(csv_path, tmp_path / "two", tmp_path / "cache", cfg_file))],
                         capture_output=True, text=True, env=env, timeout=900)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    w1, w2 = _safetensors(tmp_path / "one" / "model.safetensors"), _safetensors(tmp_path / "two" / "model.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=2e-5, rtol=1e-4), k
    m1, m2 = _metrics(tmp_path / "one" / "metrics.csv"), _metrics(tmp_path / "two" / "metrics.csv")
    assert [float(r["train_loss"]) for r in m1] == pytest.approx([float(r["train_loss"]) for r in m2], rel=1e-4)


def test_bounded_end_to_end_gradient_equals_full_backprop(demo):
    """Chunked re-computation gives the same encoder and model gradients as backprop through every region."""
    from xtpath.e2e import EndToEnd
    from xtpath.models import XTModel
    from xtpath.train import _Prepared, _loss, _model_config

    root, csv_path = demo
    rows = read_slides_csv(csv_path)[:1]
    prep = _Prepared(rows, ["apart", "touch"], [0], [], [], (), {})
    grads = {}
    for mode in ("full", "bounded"):
        cfg = _cfg(mode="end2end", e2e_backprop=mode, e2e_chunk=3, augment=True, **ENC)
        torch.manual_seed(0)
        runner = EndToEnd(prep, cfg, torch.device("cpu"))
        torch.manual_seed(1)
        model = XTModel(_model_config(cfg, runner.feature_shape, 2))
        view = runner.train_dataset(None)
        view.set_epoch(3)  # a non-identity grid symmetry for this slide
        runner.train_mode()
        loss = runner.step(model, view, 0, lambda out, item: _loss(cfg, out, item, None))
        assert len(runner.plans.plan(0)[1]) > 3  # several chunks
        grads[mode] = (loss, {n: p.grad.clone() for n, p in runner.encoder.named_parameters()},
                       {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (lf, ef, mf), (lb, eb, mb) = grads["full"], grads["bounded"]
    assert lf == pytest.approx(lb, rel=1e-6)
    for name in ef:
        assert torch.allclose(ef[name], eb[name], rtol=1e-4, atol=1e-6), name
    assert any(float(g.abs().sum()) > 0 for g in ef.values())
    for name in mf:
        assert torch.allclose(mf[name], mb[name], rtol=1e-4, atol=1e-6), name


def test_end_to_end_training_runs(demo, tmp_path):
    root, csv_path = demo
    cfg = _cfg(mode="end2end", epochs=1, e2e_chunk=8, accumulate=2, **ENC)
    rep = train(csv_path, tmp_path / "e2e", cfg, show_progress=False, log=lambda m: None)
    assert (tmp_path / "e2e" / "encoder.safetensors").exists()
    assert np.isfinite(rep["metrics"]["loss"])
    # scoring uses the fine-tuned encoder: new features, and the caches made before training are refused
    from xtpath.cache import read_settings
    from xtpath.models.encoders import file_sha256
    from xtpath.score import score_slides

    rows = read_slides_csv(csv_path)[:1]
    done = score_slides(rows, tmp_path / "e2e", tmp_path / "scored")
    assert done.scored == [rows[0].slide_id] and not done.failed
    stored = read_settings(tmp_path / "scored" / "cache" / f"{rows[0].slide_id}.h5")
    assert stored["weights_sha256"] == file_sha256(tmp_path / "e2e" / "encoder.safetensors")
    with pytest.raises(CacheError, match="made with weights_sha256='random-init:seed=0'"):
        score_slides(rows, tmp_path / "e2e", tmp_path / "old", cache_dir=root / "cache")


def test_segmentation_on_demo_masks(demo, tmp_path):
    root, csv_path = demo
    cfg = _cfg(task="segmentation", cache=str(root / "cache"), epochs=4, context="mamba", patience=100)
    rep = train(csv_path, tmp_path / "seg", cfg, show_progress=False, log=lambda m: None)
    assert rep["classes"] == ["background", "dense", "pink"]
    m = rep["metrics"]
    assert set(m) >= {"dice", "iou", "dice_per_class", "iou_per_class"}
    # the two tissue kinds are different textures: every region's kind is learnt
    assert m["dice_per_class"][1] > 0.8 and m["dice_per_class"][2] > 0.8, m
    assert (tmp_path / "seg" / "segmentation.png").exists()


def test_label_image_masks_need_the_class_names(demo, tmp_path):
    from PIL import Image

    root, csv_path = demo
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "labels.png")
    rows[1]["mask"] = str(tmp_path / "labels.png")
    edited = Path(csv_path).parent / "label_image_masks.csv"  # beside the slides: their paths are relative
    with open(edited, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = _cfg(task="segmentation", cache=str(root / "cache"), epochs=1)
    with pytest.raises(InvalidParameterError,
                       match=r"label_image_masks.csv:3: mask labels.png is a label image.*classes: "):
        train(edited, tmp_path / "run", cfg, show_progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def _edited_csv(csv_path: Path, name: str, edit) -> Path:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    path = Path(csv_path).parent / name  # beside the slides: their paths are relative
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_labels_spelt_two_ways_are_refused_and_a_slide_listed_twice_is_warned_about(demo, tmp_path):
    root, csv_path = demo

    def respell(rows):
        rows[2]["label"] = rows[2]["label"].capitalize()

    with pytest.raises(ManifestError, match=r"labels that differ only in case, spaces or number format: "
                                            r"'(Touch|Apart)' \(respelt.csv:4\) vs '(touch|apart)' "):
        train(_edited_csv(csv_path, "respelt.csv", respell), tmp_path / "a", _cfg(cache=str(root / "cache")),
              show_progress=False, log=lambda m: None)

    def respell_and_lose(rows):  # a slide file that is not there as well: both problems in one message
        respell(rows)
        rows[5]["path"] = "gone.tif"

    with pytest.raises(ManifestError, match=r"(?s)both.csv:7: slide 'gone.tif' not found .*\nlabels that differ only "
                                            r"in case, spaces or number format: '(Touch|Apart)' \(both.csv:4\)"):
        train(_edited_csv(csv_path, "both.csv", respell_and_lose), tmp_path / "a", _cfg(cache=str(root / "cache")),
              show_progress=False, log=lambda m: None)

    def numbers(rows):
        for i, r in enumerate(rows):
            r["label"] = ["1", "0"][i % 2] if i != 3 else "1.0"

    with pytest.raises(ManifestError, match=r"'1' \(numbers.csv:2\) vs '1.0' \(numbers.csv:5\)"):
        train(_edited_csv(csv_path, "numbers.csv", numbers), tmp_path / "b", _cfg(cache=str(root / "cache")),
              show_progress=False, log=lambda m: None)

    def twice(rows):
        rows.append({**rows[0], "slide_id": "copy_of_0", "split": "test", "case_id": "another_case"})

    said = []
    csv2 = _edited_csv(csv_path, "twice.csv", twice)
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    with open(csv_path, newline="") as f:
        shutil.copy(cache / f"{next(csv.DictReader(f))['slide_id']}.h5", cache / "copy_of_0.h5")
    train(csv2, tmp_path / "c", _cfg(cache=str(cache), epochs=1), show_progress=False, log=said.append)
    assert any("is listed 2 times (twice.csv:2, twice.csv:" in m and "training and test" in m for m in said), said


def test_k_fold_cross_validation(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 12, seed=4)
    said = []
    rep = train(csv_path, tmp_path / "cv", _cfg(cache=str(tmp_path / "cache"), epochs=1, folds=3, context="mean"),
                show_progress=False, log=said.append)
    assert [f["split"] for f in rep["folds"]] == ["fold0", "fold1", "fold2"]
    assert sum(f["n_test"] for f in rep["folds"]) == 12
    n_train = round(sum(f["n_train"] for f in rep["folds"]) / 3)
    assert f"--folds 3: each fold tests on one of 3 parts, validates on another and trains on the rest (about " \
        f"{n_train} of 12 slides); 5 or more folds train on more of them" in said, said
    for k in range(3):
        assert (tmp_path / "cv" / f"fold{k}" / "model.safetensors").exists()
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    summary = report["summary"]
    assert len(summary["accuracy"]["folds"]) == 3
    # out of fold: every slide once, from the fold whose test part held it, with that fold's probabilities
    with open(tmp_path / "cv" / "splits.csv") as f:
        tested_in = {r["slide_id"]: next(k for k, v in r.items() if v == "test") for r in csv.DictReader(f)}
    with open(tmp_path / "cv" / "predictions.csv") as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in oof) == sorted(tested_in) and len(oof) == 12
    for r in oof:
        assert r["fold"] == tested_in[r["slide_id"]]
        with open(tmp_path / "cv" / r["fold"] / "predictions.csv") as f:
            own = next(x for x in csv.DictReader(f) if x["slide_id"] == r["slide_id"])
        assert {k: own[k] for k in own} == {k: r[k] for k in own}
    pooled = report["out_of_fold"]["metrics"]
    assert pooled["accuracy"] == pytest.approx(np.mean([r["predicted"] == r["label"] for r in oof]))
    assert sum(map(sum, pooled["confusion_matrix"])) == 12
    assert (tmp_path / "cv" / "roc.png").exists() and (tmp_path / "cv" / "confusion.png").exists()
    # a second run into the same folder would leave stale folds for score to average: refused
    with pytest.raises(InvalidParameterError, match="already holds a run; pass --resume"):
        train(csv_path, tmp_path / "cv", _cfg(cache=str(tmp_path / "cache"), epochs=1, folds=4, context="mean"),
              show_progress=False, log=lambda m: None)
    # a fold scores on its own (its class map and encoder settings are the run's)
    from xtpath.score import load_run

    assert load_run(tmp_path / "cv" / "fold1").classes == load_run(tmp_path / "cv").classes
    with pytest.raises(CheckpointError, match=r"fold9: no such run folder; \S+cv has fold0, fold1, fold2$"):
        load_run(tmp_path / "cv" / "fold9")
    # scores of one fold's model are reported on that fold's test slides only: its train and val parts are in
    # the CV root's splits.csv, under the fold's column (these synthetic slides have no pixels to score)
    from xtpath.report import _seen_in_training

    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "score.json").write_text(json.dumps({"model": str(tmp_path / "cv" / "fold1")}))
    seen, where, unknown = _seen_in_training(tmp_path / "s1")
    assert where == tmp_path / "cv" / "splits.csv" and unknown is None
    assert seen == {i for i in tested_in if tested_in[i] != "fold1"} and len(seen) < 12
    # the run folder moved away: nothing can be left out, and the reason is given (report prints a warning)
    (tmp_path / "s1" / "score.json").write_text(json.dumps({"model": str(tmp_path / "moved" / "fold1")}))
    seen, where, unknown = _seen_in_training(tmp_path / "s1")
    assert seen == set() and where is None
    assert unknown == f"{tmp_path / 'moved' / 'fold1' / 'splits.csv'} (the scoring model's run, from score.json) " \
                      "cannot be read: moved or deleted?"


def test_bad_inputs_stop_before_training(demo, tmp_path):
    root, csv_path = demo
    text = Path(csv_path).read_text().replace("apart", "benign", 1)
    bad = root / "bad_labels.csv"
    bad.write_text(text)
    with pytest.raises(ManifestError, match=r"bad_labels.csv:3: label 'benign' is not in the class map"):
        train(bad, tmp_path / "a", _cfg(cache=str(root / "cache"), classes=["apart", "touch"]),
              show_progress=False)
    with pytest.raises(CacheError, match=r"cache: its 8 caches were made with encoder='test_convnext'; this run asks "
                                         r"for 'test_resnet'\. To train on them, leave out --encoder .* or pass "
                                         r"--encoder test_convnext; or give another --cache$"):
        train(csv_path, tmp_path / "b", _cfg(cache=str(root / "cache"), **{**ENC, "encoder": "test_resnet"}),
              show_progress=False)
    nomask = root / "nomask.csv"
    lines = Path(csv_path).read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:-1]) + ","
    nomask.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match="nomask.csv:3: empty mask"):
        train(nomask, tmp_path / "c", _cfg(task="segmentation", cache=str(root / "cache")), show_progress=False)
    with pytest.raises(InvalidParameterError, match="unknown option"):
        cfg_file = tmp_path / "x.yaml"
        cfg_file.write_text("epochz: 3\n")
        load_config(cfg_file, {})
    with pytest.raises(CacheError, match="the caches were made with features_kind='pooled', this run asks for "
                                         "'tokens'"):
        train(csv_path, tmp_path / "d", _cfg(cache=str(root / "cache"), features="tokens"), show_progress=False)
    for p in ("a", "b", "c", "d"):
        assert not (tmp_path / p / "model.safetensors").exists()


def test_cli_train_with_yaml_and_overrides(demo, tmp_path):
    root, csv_path = demo
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text(yaml.safe_dump({"epochs": 5, "context": "abmil", "accumulate": 2,
                                        "context_options": {"d_model": 32}}))
    r = _run_cli("train", csv_path, "--out", tmp_path / "run", "--config", cfg_file, "--epochs", "1",
                 "--cache", root / "cache", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("done: ")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["context"] == "abmil"  # CLI wins over YAML, YAML over defaults
    assert len(_metrics(tmp_path / "run" / "metrics.csv")) == 1
    # --resume with a mistyped --out trains from the start, and says so
    r = _run_cli("train", csv_path, "--out", tmp_path / "rnu", "--config", cfg_file, "--epochs", "1",
                 "--cache", root / "cache", "--device", "cpu", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"warning: --resume: {tmp_path / 'rnu'} holds no finished epoch yet; training starts from the " \
        "beginning" in r.stderr


def test_evaluation_loss_of_a_class_without_training_slides_and_folds_without_a_metric():
    from types import SimpleNamespace

    from xtpath.train import _aggregate, _loss

    cfg = _cfg()
    out = SimpleNamespace(logits=torch.tensor([[0.3, -0.2]]))
    item = SimpleNamespace(label=1)
    weights = torch.tensor([1.0, 0.0])  # class 1 has no training slide
    plain = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1]))
    assert torch.isclose(_loss(cfg, out, item, weights), plain)  # not 0 / 0
    # one slide per loss: its class's weight scales it (cross_entropy's weight= alone would cancel out)
    assert torch.isclose(_loss(cfg, out, SimpleNamespace(label=0), torch.tensor([2.0, 1.0])),
                         2.0 * torch.nn.functional.cross_entropy(out.logits, torch.tensor([0])))
    seg = _cfg(task="segmentation")
    logits = torch.randn(2, 3, 4, 4)
    tgt = torch.full((2, 4, 4), 2)
    tgt[0, 0, 0] = -100
    got = _loss(seg, SimpleNamespace(mask_logits=logits), SimpleNamespace(targets=tgt), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.isclose(got, torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100))
    folds = [{"metrics": {"auc": a, "accuracy": 1.0}} for a in (float("nan"), 0.75, 0.25)]
    summary = _aggregate(folds)["summary"]
    assert summary["auc"]["mean"] == 0.5 and summary["auc"]["n_folds"] == 2 and summary["accuracy"]["n_folds"] == 3


def test_class_weights_change_what_an_imbalanced_cohort_trains(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 24, seed=5)
    lines = csv_path.read_text().splitlines()
    touch = [ln for ln in lines[1:] if ",touch," in ln]
    imbalanced = tmp_path / "imbalanced.csv"  # every 'apart' slide, three 'touch' ones
    imbalanced.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ",apart," in ln] + touch[:3]) + "\n")
    runs = {}
    for on in (True, False):
        train(imbalanced, tmp_path / f"cw{on}", _cfg(cache=str(tmp_path / "cache"), epochs=2, context="mean",
                                                       class_weights=on), show_progress=False, log=lambda m: None)
        runs[on] = _safetensors(tmp_path / f"cw{on}" / "model.safetensors")
    assert runs[True].keys() == runs[False].keys()
    assert any(not torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


def test_a_misspelt_label_is_named_with_the_class_it_resembles(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 12, seed=4)
    lines = csv_path.read_text().splitlines()
    i = next(k for k, ln in enumerate(lines) if ",touch," in ln)
    lines[i] = lines[i].replace(",touch,", ",tuoch,")
    csv_path.write_text("\n".join(lines) + "\n")
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks from scikit-learn with a class missing from a part
        train(csv_path, tmp_path / "run", _cfg(cache=str(tmp_path / "cache"), epochs=1, context="mean"),
              show_progress=False, log=said.append)
    assert "warning: class 'tuoch' has a single slide: it cannot be in training and evaluation both; did you mean " \
        "'touch'? (a misspelt label is a class of its own: fix it in the CSV)" in said, said


def test_caches_must_agree_with_each_other_and_with_the_options(demo, tmp_path):
    import shutil

    root, csv_path = demo
    rows = read_slides_csv(csv_path)
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "cache", mixed)
    extract_slides(rows[1:2], mixed, ExtractConfig(**{**ENC, "target_mpp": 2.0}, num_workers=0, overwrite=True))
    with pytest.raises(CacheError, match=rf"{rows[1].slide_id}.h5 was made with target_mpp=2.0, this run uses 1.0"):
        train(csv_path, tmp_path / "a", _cfg(cache=str(mixed)), show_progress=False)
    with pytest.raises(CacheError, match="the caches were made with target_mpp=1.0, this run asks for 2.0"):
        train(csv_path, tmp_path / "b", _cfg(cache=str(root / "cache"), target_mpp=2.0), show_progress=False)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the weights the caches were made with")
    with pytest.raises(CacheError, match="the caches were made with weights_sha256='random-init:seed=0'"):
        train(csv_path, tmp_path / "c", _cfg(cache=str(root / "cache"), weights=str(other)), show_progress=False)
    for p in ("a", "b", "c"):
        assert not (tmp_path / p / "model.safetensors").exists()
    # naming the encoder but not the caches' geometry: one message, with the options that give it
    with pytest.raises(CacheError, match=r"cache: its 8 caches were made with encoder_px=64, target_mpp=1.0, "
                                         r"region_px=128; this run asks for .*, 0.5, 256. To train on them, leave out "
                                         r"--encoder .* or pass --encoder-px 64 --target-mpp 1.0 --region-px 128; or "
                                         r"give another --cache$"):
        train(csv_path, tmp_path / "e", _cfg(cache=str(root / "cache"), encoder="test_convnext"), show_progress=False)
    with pytest.raises(CacheError, match=r"or pass --seed 0 without --weights \(they were made with random weights\); "):
        train(csv_path, tmp_path / "f", _cfg(cache=str(root / "cache"), **ENC, weights=str(other)), show_progress=False)


def test_a_new_slide_in_a_cached_cohort_gets_its_cache_made_like_the_others(demo, tmp_path):
    import shutil

    from xtpath.cache import read_settings, settings_differences

    root, csv_path = demo
    rows = read_slides_csv(csv_path)
    grown = tmp_path / "grown"
    shutil.copytree(root / "cache", grown)
    (grown / f"{rows[2].slide_id}.h5").unlink()  # the new slide
    said = []
    train(csv_path, tmp_path / "d", _cfg(cache=str(grown), epochs=1, context="mean"), show_progress=False,
          log=said.append)
    assert f"building 1 missing feature caches in {grown} the way the other caches were made (test_convnext, " \
        "128 px at 1 µm/px)" in said, said
    made, before = read_settings(grown / f"{rows[2].slide_id}.h5"), read_settings(root / "cache" / f"{rows[2].slide_id}.h5")
    assert settings_differences(made, before) == []
    with h5py.File(grown / f"{rows[2].slide_id}.h5") as a, h5py.File(root / "cache" / f"{rows[2].slide_id}.h5") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert np.allclose(a["features"][:], b["features"][:], atol=1e-5)


def test_bad_options_stop_before_a_run_folder_is_made(demo, tmp_path):
    root, csv_path = demo
    for kw, msg in [({"lr": -1.0}, "lr=-1.0 must be a positive number"),
                    ({"target_mpp": 0}, "target_mpp=0 must be a positive number"),
                    ({"target_mpp": float("inf")}, "target_mpp=inf must be a positive number"),
                    ({"folds": 2}, "needs at least 3 folds"), ({"val_fraction": 1.0}, "below 1"),
                    ({"weights": str(tmp_path / "nope.safetensors")}, "nope.safetensors: no such file"),
                    ({"context_options": {"d_model": 32, "n_layer": 1}},
                     "context_options: unknown option.s. n_layer; valid: .*n_layers"),
                    ({"head_options": {"foo": 1}}, "head_options: unknown option.s. foo; valid: .*upsample"),
                    ({"context_options": {"d_model": 30}}, "context.d_model must be a positive multiple of 4"),
                    ({"monitor": "aucc"}, "monitor='aucc': for classification use one of auto, auc, "),
                    ({"task": "segmentation", "monitor": "auc"}, "for segmentation use one of auto, dice, iou"),
                    ({"classes": "apart"}, "classes='apart': expected a list of class names"),
                    ({"patience": 0}, "patience=0 must be at least 1"),
                    ({"min_tissue": 2.0}, "min_tissue=2.0 must be a fraction from 0 to 1"),
                    ({"warmup_epochs": -3.0}, "warmup_epochs=-3.0 must be 0 or more"),
                    ({"features": "foo"}, "features='foo': use pooled .* or tokens"),
                    ({"region_px": 128.5}, "region_px=128.5 must be a positive whole number of pixels")]:
        with pytest.raises(InvalidParameterError, match=msg):
            _cfg(**kw)
    r = _run_cli("train", csv_path, "--out", tmp_path / "run", "--cache", root / "cache", "--lr", "-1")
    assert r.returncode == 1 and r.stderr.strip() == "error: lr=-1.0 must be a positive number (e.g. --lr 2e-4)"
    # YAML values of the wrong type, and a device torch does not know, are one line each
    for text, msg in [("epochs: three\n", r"epochs: .three. is not a whole number \(e.g. epochs: "),
                      ("epochs: 2.5\n", "epochs: 2.5 is not a whole number"),
                      ("lr: fast\n", "lr: .fast. is not a number"),
                      ("balanced_sampling: 3\n", "balanced_sampling: 3 is not true or false"),
                      ("context_options: {d_model: abc}\n", r"context_options.d_model: .abc. is not a whole number"),
                      ("context_options: {dropout: high}\n", r"context_options.dropout: .high. is not a number"),
                      ("context_options: {scan_chunk: 1.5}\n", "context_options.scan_chunk: 1.5 is not a whole"),
                      ("encoder_px: big\n", "encoder_px='big' must be a positive whole number of pixels")]:
        (tmp_path / "c.yaml").write_text(text)
        r = _run_cli("train", csv_path, "--out", tmp_path / "run", "--cache", root / "cache", "--config",
                     tmp_path / "c.yaml")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert re.search(msg, r.stderr), r.stderr
    r = _run_cli("train", csv_path, "--out", tmp_path / "run", "--cache", root / "cache", "--device", "tpu")
    assert r.returncode == 1 and r.stderr.strip() == "error: --device tpu: use auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "run").exists()


def test_a_single_class_validation_set_selects_by_loss_and_the_splits_are_saved(tmp_path):
    csv_path = write_arrangement_dataset(tmp_path, 12, seed=5)
    lines = csv_path.read_text().splitlines()
    labels = [ln.split(",")[2] for ln in lines[1:]]
    val = [i for i, lab in enumerate(labels) if lab == "apart"][:2]
    test = [i for i, lab in enumerate(labels) if lab == "apart"][2:3] + [labels.index("touch")]
    parts = ["val" if i in val else "test" if i in test else "train" for i in range(len(labels))]
    csv_path.write_text("\n".join([lines[0] + ",split"] + [f"{ln},{p}" for ln, p in zip(lines[1:], parts)]) + "\n")
    said = []
    rep = train(csv_path, tmp_path / "run", _cfg(cache=str(tmp_path / "cache"), epochs=4, context="mean",
                                                 patience=100), show_progress=False, log=said.append)
    assert sum("val auc is undefined" in m for m in said) == 1, said
    val_loss = [float(r["val_loss"]) for r in _metrics(tmp_path / "run" / "metrics.csv")]
    assert rep["best_epoch"] == int(np.argmin(val_loss)) + 1
    with open(tmp_path / "run" / "splits.csv") as f:
        saved = list(csv.DictReader(f))
    assert [r["split"] for r in saved] == parts and [r["label"] for r in saved] == labels
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["classes"] == ["apart", "touch"]


def test_a_bad_value_names_the_yaml_file_it_came_from(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: -1\nlr: 0.001\n")
    with pytest.raises(InvalidParameterError, match=rf"^--config {re.escape(str(bad))}: epochs=-1 must be at least 1$"):
        load_config(bad, {})
    with pytest.raises(InvalidParameterError, match=r"^epochs=0 must be at least 1$"):  # given on the command line
        load_config(bad, {"epochs": 0})
    assert load_config(bad, {"epochs": 2}).lr == 0.001


def _foreign_caches(src: Path, dst: Path, attrs: dict, scale: int = 1) -> None:
    """CLAM- or TRIDENT-style copies of xtpath caches: only ``coords`` (with ``attrs``; CLAM's feature files
    have none, and int32 coordinates) and ``features``; ``scale`` multiplies the coordinates."""
    dst.mkdir()
    for f in sorted(src.glob("*.h5")):
        with h5py.File(f, "r") as a, h5py.File(dst / f.name, "w") as b:
            coords = a["coords"][:] * scale
            b.create_dataset("coords", data=coords if attrs else coords.astype(np.int32)).attrs.update(attrs)
            b.create_dataset("features", data=a["features"][:])


def test_training_and_scoring_on_clam_and_trident_feature_files(demo, tmp_path):
    from xtpath.score import score_slides

    root, csv_path = demo
    # the demo slides are 0.5 µm/px: 128-px regions at 1 µm/px are 256 level-0 pixels
    _foreign_caches(root / "cache", tmp_path / "clam", {})  # as CLAM's extract_features_fp.py writes them
    _foreign_caches(root / "cache", tmp_path / "trident",
                    {"patch_size": 128, "patch_size_level0": 256, "target_magnification": 10.0,
                     "level0_magnification": 20.0, "overlap": 0})
    # CLAM's files record no resolution: one line asking for it, before training
    with pytest.raises(CacheError, match=r"clam/\w+\.h5: a feature file not made by xtpath \(CLAM-style: coords and "
                                         r"features\) does not record the resolution of its patches; pass "
                                         r"--target-mpp and --region-px"):
        train(csv_path, tmp_path / "r0", _cfg(cache=str(tmp_path / "clam"), epochs=1, context="mean"),
              show_progress=False, log=lambda m: None)
    said = []
    rep = train(csv_path, tmp_path / "r1", _cfg(cache=str(tmp_path / "clam"), epochs=1, context="mean",
                                                target_mpp=1.0, region_px=128), show_progress=False, log=said.append)
    assert rep["n_train"] + rep["n_val"] + rep["n_test"] == 8
    assert any("training on feature files not made by xtpath" in m and "regions of 128 px at 1 µm/px" in m
               for m in said), said
    assert not any(m.startswith("warning:") and "µm wide" in m for m in said), said
    # the size of the files' regions on a training slide, which score checks other files against
    assert json.loads((tmp_path / "r1" / "foreign_regions.json").read_text())["region_um"] == 128.0
    # TRIDENT's record it (10x = 1 µm/px)
    trident_cfg = yaml.safe_load((tmp_path / "r1" / "config.yaml").read_text())
    train(csv_path, tmp_path / "r2", _cfg(cache=str(tmp_path / "trident"), epochs=1, context="mean"),
          show_progress=False, log=lambda m: None)
    cfg2 = yaml.safe_load((tmp_path / "r2" / "config.yaml").read_text())
    assert (cfg2["target_mpp"], cfg2["region_px"]) == (1.0, 128) == (trident_cfg["target_mpp"],
                                                                      trident_cfg["region_px"])
    # scoring with those files: CLAM records no region size; the regions' spacing gives it
    rows = read_slides_csv(csv_path)
    s = score_slides(rows[:2], tmp_path / "r1", tmp_path / "sc", cache_dir=tmp_path / "clam")
    assert sorted(s.scored) == sorted(r.slide_id for r in rows[:2]) and not s.failed
    with h5py.File(tmp_path / "sc" / rows[0].slide_id / "regions.h5", "r") as f, \
            h5py.File(root / "cache" / f"{rows[0].slide_id}.h5", "r") as c:
        assert np.array_equal(f["coords"][:], c["coords"][:]) and float(f["coords"].attrs["patch_size_level0"]) == 256
        assert np.array_equal(f["grid"][:], c["grid"][:])  # the same cells as xtpath's own cache
    # files patched at another size than the training files (512-px regions here) are refused, slide by slide
    _foreign_caches(root / "cache", tmp_path / "clam2x", {}, scale=2)
    s = score_slides(rows[:1], tmp_path / "r1", tmp_path / "sc3", cache_dir=tmp_path / "clam2x")
    assert not s.scored and "its regions are 512 px wide at level 0, 256 µm on this slide, but the model was " \
        "trained on regions of 128 µm" in s.failed[rows[0].slide_id]
    # training on such files with options that say another size: warned (the files' own size is what counts)
    said = []
    train(csv_path, tmp_path / "r3", _cfg(cache=str(tmp_path / "clam2x"), epochs=1, context="mean", target_mpp=1.0,
                                          region_px=128), show_progress=False, log=said.append)
    assert any(m.startswith(f"warning: {rows[0].slide_id}.h5's regions are 256 µm wide on ") and
               "but 128 px at 1 µm/px are 128 µm; give the --target-mpp and --region-px the files were made at" in m
               for m in said), said
    # without them, each slide fails with the reason (nothing is extracted with some other encoder)
    s = score_slides(rows[2:4], tmp_path / "r1", tmp_path / "sc2", cache_dir=tmp_path / "empty")
    assert not s.scored and set(s.failed) == {r.slide_id for r in rows[2:4]}
    msg = s.failed[rows[2].slide_id]
    assert "was trained on feature files not made by xtpath (its run has no extract.json), so xtpath cannot make " \
           "them for this slide: give --cache with the slide's feature file from the same extractor" in msg
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").glob("*.h5"))


def test_a_split_without_validation_or_test_slides_is_said_and_reported_as_such(tmp_path):
    # a split column with train and val rows only: the final metrics are on the val slides, which chose the epoch
    csv_path = write_arrangement_dataset(tmp_path, 12, seed=4, split={"train": 8, "val": 4})
    said = []
    rep = train(csv_path, tmp_path / "a", _cfg(cache=str(tmp_path / "cache"), epochs=1, context="mean"),
                show_progress=False, log=said.append)
    assert "warning: no test slides: the final metrics are on the validation slides, which also chose the best " \
           "epoch, so they flatter the model; add slides, or test rows to the CSV's split column" in said
    assert rep["evaluated_on"] == "val" and rep["n_test"] == 0
    # one training case and nothing else to hold out: neither part, and the report says it is the train split
    lines = csv_path.read_text().splitlines()
    one = tmp_path / "one.csv"
    one.write_text("\n".join([lines[0]] + [ln.rsplit(",", 2)[0] + ",caseA,train" for ln in lines[1:4]]) + "\n")
    said = []
    rep = train(one, tmp_path / "b", _cfg(cache=str(tmp_path / "cache"), epochs=1, context="mean"),
                show_progress=False, log=said.append)
    assert any(m.startswith("warning: no validation slides (3 slides, too few per class to hold some out): the "
                            "best epoch is chosen on the training slides") for m in said), said
    assert "warning: no test slides: the final metrics are on the training slides, so they flatter the model; " \
           "add slides, or test rows to the CSV's split column" in said
    assert rep["evaluated_on"] == "train" and (rep["n_train"], rep["n_val"], rep["n_test"]) == (3, 0, 0)
