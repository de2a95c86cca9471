"""``xtpath report``: read a score folder back, with metrics when the labels are known."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.errors import InvalidParameterError, ManifestError
from xtpath.io import read_slides_csv
from xtpath.io.files import write_json
from xtpath.metrics import classification_metrics, jsonable, roc_and_confusion_plots
from xtpath.score import PREDICTIONS_CSV, read_predictions

__all__ = ["report"]


def _seen_in_training(out: Path) -> tuple[set[str], Path | None]:
    """Slides the scoring model trained or validated on (any fold), from the run's ``splits.csv`` named by
    ``OUT_DIR/score.json``: metrics on them would flatter the model."""
    import csv
    import json

    try:
        run = Path(json.loads((out / "score.json").read_text())["model"])
        with open(run / "splits.csv", newline="") as f:
            table = list(csv.DictReader(f))
    except (OSError, ValueError, KeyError, TypeError):
        return set(), None
    return {r["slide_id"] for r in table
            if any(v in ("train", "val") for k, v in r.items() if k not in ("slide_id", "label"))}, run / "splits.csv"


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
    """Summarise ``OUT_DIR/predictions.csv``; with a labelled slides CSV also compute metrics and write
    ``OUT_DIR/report/report.json``, ``roc.png`` and ``confusion.png``.

    Raises
    ------
    InvalidParameterError
        No predictions in the folder.
    ManifestError
        Labels that are not classes of the model.
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
        task = _task(out, preds)
        if task != "classification":
            raise InvalidParameterError(f"--labels {labels_csv}: metrics against labels are for classification; "
                                        f"{out} holds {task} scores (Dice and IoU on held-out masks are in the "
                                        "training run's report)")
        table = read_slides_csv(labels_csv, check_files=False, require_path=False)
        if not any(r.label for r in table):
            raise ManifestError(f"{labels_csv}: no labels; --labels needs a CSV with slide_id,label columns")
        rows = {r.slide_id: r for r in table if r.label}  # unlabelled rows are left out
        rep["labelled_not_scored"] = sorted(set(rows) - {p["slide_id"] for p in preds})
        index = {c: i for i, c in enumerate(classes)}
        bad = [f"{r.where}: label {r.label!r} is not a class of the model ({', '.join(classes)})"
               for r in rows.values() if r.label not in index]
        if bad:
            raise ManifestError("\n".join(bad))
        known = [p for p in preds if p["slide_id"] in rows]
        seen, splits_file = _seen_in_training(out)
        if seen:
            rep["excluded_seen"] = sum(p["slide_id"] in seen for p in known)
            rep["splits_file"] = str(splits_file)
            known = [p for p in known if p["slide_id"] not in seen]
        if known:
            P = np.array([[float(p[f"p_{c}"]) for c in classes] for p in known])
            Y = np.array([index[rows[p["slide_id"]].label] for p in known])  # type: ignore[index]
            rep["n_labelled"] = len(known)
            rep["metrics"] = classification_metrics(P, Y, len(classes))
            folder = out / "report"
            folder.mkdir(exist_ok=True)
            rep["metrics"]["confusion_matrix"] = roc_and_confusion_plots(P, Y, classes, folder, title="scored")
    (out / "report").mkdir(exist_ok=True)
    if "metrics" not in rep:  # plots of an earlier report would contradict this one
        for name in ("roc.png", "confusion.png"):
            (out / "report" / name).unlink(missing_ok=True)
    write_json(out / "report" / "report.json", jsonable(rep))
    return rep
