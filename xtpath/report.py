"""``xtpath report``: read a score folder back, with metrics when the labels are known."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.cache import derive_grid
from xtpath.errors import InvalidParameterError, ManifestError
from xtpath.io import read_slides_csv
from xtpath.io.files import write_json
from xtpath.metrics import classification_metrics, jsonable, roc_and_confusion_plots
from xtpath.score import PREDICTIONS_CSV, read_predictions

__all__ = ["report"]


def _seen_in_training(out: Path) -> tuple[set[str], Path | None, str | None]:
    """Slides the scoring model trained or validated on (any fold), from the run's ``splits.csv`` named by
    ``OUT_DIR/score.json``: metrics on them would flatter the model. The third value says why they are unknown
    (no ``score.json``, the run folder moved): then no slide can be left out, and the report says so."""
    import csv
    import json

    try:
        run = Path(json.loads((out / "score.json").read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return set(), None, f"{out / 'score.json'} is missing or names no model"
    splits, only = run / "splits.csv", None
    if not splits.exists() and (run.parent / "splits.csv").exists():  # one fold of a CV run: its column
        splits, only = run.parent / "splits.csv", run.name
    try:
        with open(splits, newline="") as f:
            table = list(csv.DictReader(f))
    except OSError:
        return set(), None, f"{splits} (the scoring model's run, from score.json) cannot be read: moved or deleted?"
    if only is not None and table and only not in table[0]:
        return set(), None, f"{splits} has no column {only!r}"
    return {r["slide_id"] for r in table
            if any(v in ("train", "val") for k, v in r.items() if k not in ("slide_id", "label")
                   and (only is None or k == only))}, splits, None


def _task(out: Path, preds: list[dict[str, str]]) -> str:
    """The task of the model that scored ``out`` (from a slide's ``prediction.json``)."""
    import json

    for p in preds:
        try:
            return str(json.loads((out / p["slide_id"] / "prediction.json").read_text()).get("task",
                                                                                          "classification"))
        except (OSError, ValueError):
            continue
    return "classification"


def report(out_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Summarise ``OUT_DIR/predictions.csv`` into ``OUT_DIR/report/report.json``; with a slides CSV of ground
    truth also compute metrics on the slides the model did not train or validate on: for a classifier, against
    the ``label`` column (``roc.png``, ``confusion.png``); for a segmenter, Dice and IoU of each ``mask.ome.tif``
    against the ``mask`` column (``segmentation.png``).

    Raises
    ------
    InvalidParameterError
        No predictions in the folder.
    ManifestError
        Labels (or mask classes) that are not classes of the model, masks not found.
    """
    out = Path(out_dir)
    preds = read_predictions(out)
    if not preds:
        raise InvalidParameterError(f"{out / PREDICTIONS_CSV}: no predictions; run xtpath score first")
    need = {"slide_id", "predicted", "n_regions", "seconds"}
    if not need <= set(preds[0]) or (out / "model.safetensors").exists():
        raise InvalidParameterError(f"{out}: not a folder written by xtpath score (its predictions.csv lacks "
                                    f"{', '.join(sorted(need - set(preds[0]))) or 'nothing, but it is a run'}); "
                                    "give the --out folder of xtpath score")
    classes = [k[2:] for k in preds[0] if k.startswith("p_")]
    counts = {c: sum(p["predicted"] == c for p in preds) for c in classes}
    seconds = np.array([float(p["seconds"]) for p in preds])
    regions = np.array([int(p["n_regions"]) for p in preds])
    failures = out / "failures.csv"
    n_failed = max(0, len(failures.read_text().splitlines()) - 1) if failures.exists() else 0
    rep: dict[str, Any] = {"n_scored": len(preds), "n_failed": n_failed, "classes": classes,
                           "predicted_counts": counts, "seconds_per_slide": float(seconds.mean()),
                           "regions_per_slide": float(regions.mean())}
    if labels_csv is not None:
        if not Path(labels_csv).is_file():
            raise InvalidParameterError(f"--labels {labels_csv}: no such file; give a CSV with slide_id,label "
                                        "columns (a classifier's scores) or slide_id,mask (a segmenter's)")
        if _task(out, preds) == "segmentation":
            _segmentation_report(out, preds, classes, Path(labels_csv), rep)
        else:
            _classification_report(out, preds, classes, Path(labels_csv), rep)
    (out / "report").mkdir(exist_ok=True)
    if "metrics" not in rep:  # plots of an earlier report would contradict this one
        for name in ("roc.png", "confusion.png", "segmentation.png"):
            (out / "report" / name).unlink(missing_ok=True)
    write_json(out / "report" / "report.json", jsonable(rep))
    return rep


def _held_out(out: Path, preds: list[dict[str, str]], labelled: set[str], rep: dict[str, Any]) -> list[dict[str, str]]:
    """The scored slides with ground truth, less those the model trained or validated on (noted in ``rep``)."""
    not_scored = labelled - {p["slide_id"] for p in preds}
    known = [p for p in preds if p["slide_id"] in labelled]
    seen, splits_file, unknown = _seen_in_training(out)
    # labelled slides the model trained or validated on would be left out anyway: not "missing"
    rep["labelled_not_scored"] = sorted(not_scored - seen)
    rep["not_scored_seen"] = len(not_scored & seen)
    if unknown:
        rep["training_slides_unknown"] = unknown
    if seen:
        other = _other_slides_same_ids(out, splits_file, {p["slide_id"] for p in known} & seen)
        if other:  # another cohort's slides that reuse training ids: held out after all
            rep["same_id_other_slide"] = sorted(other)
            seen = seen - other
        rep["excluded_seen"] = sum(p["slide_id"] in seen for p in known)
        rep["splits_file"] = str(splits_file)
        known = [p for p in known if p["slide_id"] not in seen]
    return known


def _other_slides_same_ids(out: Path, splits_file: Path | None, ids: set[str]) -> set[str]:
    """Of ``ids`` (scored, and in the run's training or validation parts by slide_id), those whose scored file
    is not the slide the model trained on: both fingerprints known (the run's ``slide_fingerprints.json``, the
    slide's ``prediction.json``) and different."""
    import json

    from xtpath.train import FINGERPRINTS_JSON

    if splits_file is None or not ids:
        return set()
    try:
        trained = json.loads((splits_file.parent / FINGERPRINTS_JSON).read_text())
    except (OSError, ValueError):
        return set()  # a run from before the fingerprints were recorded: by slide_id alone
    other = set()
    for sid in ids:
        try:
            scored = json.loads((out / sid / "prediction.json").read_text()).get("slide_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if scored and trained.get(sid) and scored != trained[sid]:
            other.add(sid)
    return other


def _classification_report(out: Path, preds: list[dict[str, str]], classes: list[str], labels_csv: Path,
                           rep: dict[str, Any]) -> None:
    """Accuracy, AUC, F1, ROC and confusion plots against the ``label`` column."""
    table = read_slides_csv(labels_csv, check_files=False, require_path=False)
    if not any(r.label for r in table):
        raise ManifestError(f"{labels_csv}: no labels; --labels needs a CSV with slide_id,label columns")
    rows = {r.slide_id: r for r in table if r.label}  # unlabelled rows are left out
    index = {c: i for i, c in enumerate(classes)}
    bad = [f"{r.where}: label {r.label!r} is not a class of the model ({', '.join(classes)})"
           for r in rows.values() if r.label not in index]
    if bad:
        raise ManifestError("\n".join(bad))
    known = _held_out(out, preds, set(rows), rep)
    if known:
        P = np.array([[float(p[f"p_{c}"]) for c in classes] for p in known])
        Y = np.array([index[rows[p["slide_id"]].label] for p in known])  # type: ignore[index]
        rep["n_labelled"] = len(known)
        rep["metrics"] = classification_metrics(P, Y, len(classes))
        folder = out / "report"
        folder.mkdir(exist_ok=True)
        rep["metrics"]["confusion_matrix"] = roc_and_confusion_plots(P, Y, classes, folder, title="scored")


class _ScoredGrid:
    """A scored slide's region grid on the slide's own cells, as :func:`xtpath.data.region_targets` reads it."""

    def __init__(self, coords: np.ndarray, region_size: float) -> None:
        self.region_size_level0 = region_size
        # cell nearest each region's level-0 corner (as score drew mask.ome.tif); not the stored grid, which
        # score folders of CLAM/TRIDENT caches from before 2026-11-27 number from their first region
        self.grid = derive_grid(coords, region_size)


def _segmentation_report(out: Path, preds: list[dict[str, str]], classes: list[str], labels_csv: Path,
                         rep: dict[str, Any]) -> None:
    """Dice and IoU of each scored slide's ``mask.ome.tif`` against the ``mask`` column (GeoJSON or label image),
    on the cells the model scored, painted on the same grid as training's held-out evaluation."""
    import json

    import h5py
    import tifffile

    from xtpath.data import region_targets
    from xtpath.metrics import IGNORE_INDEX, segmentation_metrics, segmentation_plot

    table = read_slides_csv(labels_csv, check_files=False, require_path=False)
    rows = {r.slide_id: r for r in table if r.mask is not None}
    if not rows:
        raise ManifestError(f"{labels_csv}: no row gives a mask (no mask column, or its cells are empty); the "
                            "slides were scored by a segmentation model: give a CSV with slide_id,mask columns "
                            "(QuPath GeoJSON or label images)")
    missing = [f"{r.where}: mask {r.mask} not found" for r in rows.values() if not r.mask.is_file()]  # type: ignore
    if missing:
        raise ManifestError("\n".join(missing))
    known = _held_out(out, preds, set(rows), rep)
    pred_cells, target_cells = [], []
    for p in known:
        folder = out / p["slide_id"]
        rec = json.loads((folder / "prediction.json").read_text())
        if "mask_scale" not in rec or "slide_dimensions" not in rec:
            raise InvalidParameterError(f"{folder / 'prediction.json'}: scored by an older xtpath (no mask scale); "
                                        "score again with --rescore to compare masks")
        size, scale = float(rec["region_size_level0"]), float(rec["mask_scale"])
        m = int(round(size / scale))
        with h5py.File(folder / "regions.h5", "r") as f:
            grid = _ScoredGrid(f["coords"][:], size)
        mask = tifffile.imread(folder / "mask.ome.tif", series=0, level=0)
        # each region's m x m cells of the predicted mask (255 beyond the mask's edge: not scored)
        H, W = (grid.grid.max(axis=0) + 1) * m
        full = np.full((max(H, mask.shape[0]), max(W, mask.shape[1])), 255, np.uint8)
        full[:mask.shape[0], :mask.shape[1]] = mask
        cells = np.stack([full[r * m:(r + 1) * m, c * m:(c + 1) * m] for r, c in grid.grid])
        target = region_targets(rows[p["slide_id"]], grid, classes, m,  # type: ignore[arg-type]
                                slide_dimensions=tuple(rec["slide_dimensions"]))
        target[cells == 255] = IGNORE_INDEX
        pred_cells.append(cells.astype(np.int64).ravel())
        target_cells.append(target.ravel())
    if known:
        rep["n_labelled"] = len(known)
        rep["metrics"] = segmentation_metrics(np.concatenate(pred_cells), np.concatenate(target_cells), len(classes))
        folder = out / "report"
        folder.mkdir(exist_ok=True)
        segmentation_plot(rep["metrics"], classes, folder / "segmentation.png", title="scored slides")
