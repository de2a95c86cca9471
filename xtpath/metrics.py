"""Metrics (scikit-learn) and the plots people look at: ROC curves, confusion matrix, loss curves."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xtpath.io.files import atomic_path

__all__ = ["classification_metrics", "segmentation_metrics", "roc_and_confusion_plots", "save_figure", "jsonable",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """accuracy, balanced accuracy, macro F1 and macro one-vs-rest AUC (scikit-learn).

    With more than two classes, the AUC is the mean one-vs-rest AUC of the classes the set holds (scikit-learn's
    macro AUC when it holds them all; a test part without a rare class still gets one). Balanced accuracy is the
    mean recall of the classes the set holds.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels)
    pred = probs.argmax(1)
    present = sorted(set(labels.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": a prediction of an absent class
        balanced = float(balanced_accuracy_score(labels, pred)) if len(present) > 1 else math.nan
    out = {"accuracy": float(accuracy_score(labels, pred)), "balanced_accuracy": balanced,
           "f1": float(f1_score(labels, pred, average="macro", labels=list(range(n_classes)), zero_division=0))}
    out["auc"] = math.nan  # undefined when the set holds one class (the caller says so once, not sklearn per call)
    if len(present) > 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # UndefinedMetricWarning
                if n_classes == 2:
                    out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
                else:
                    out["auc"] = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
        except ValueError:
            pass
    return out


def segmentation_metrics(pred: np.ndarray, target: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per-class and mean Dice and IoU over all labelled cells (``IGNORE_INDEX`` skipped)."""
    ok = target != IGNORE_INDEX
    p, t = pred[ok].ravel(), target[ok].ravel()
    dice, iou = [], []
    for c in range(n_classes):
        tp = float(((p == c) & (t == c)).sum())
        fp = float(((p == c) & (t != c)).sum())
        fn = float(((p != c) & (t == c)).sum())
        dice.append(2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else math.nan)
        iou.append(tp / (tp + fp + fn) if (tp + fp + fn) else math.nan)
    return {"dice": float(np.nanmean(dice)), "iou": float(np.nanmean(iou)), "dice_per_class": dice,
            "iou_per_class": iou, "accuracy": float((p == t).mean()) if len(t) else math.nan}


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def roc_and_confusion_plots(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], out_dir: Path, *,
                            title: str = "test") -> list[list[int]]:
    """Write ``roc.png`` (one curve per class) and ``confusion.png``; return the confusion matrix. With slides of a
    single class there is no ROC curve: no ``roc.png`` (an earlier one is removed), the confusion matrix only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import RocCurveDisplay

    if len(set(np.asarray(labels).tolist())) < 2:
        (Path(out_dir) / "roc.png").unlink(missing_ok=True)
        return _confusion_plot(probs, labels, classes, out_dir, title)
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(classes):
        if 0 < (labels == c).sum() < len(labels):
            RocCurveDisplay.from_predictions(labels == c, probs[:, c], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate (one class vs the rest)")
    ax.set_ylabel("true positive rate")
    auc = classification_metrics(probs, labels, len(classes)).get("auc", math.nan)
    ax.set_title(f"ROC ({title}, macro AUC {auc:.3f})")
    save_figure(fig, Path(out_dir) / "roc.png")
    return _confusion_plot(probs, labels, classes, out_dir, title)


def _confusion_plot(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], out_dir: Path,
                    title: str) -> list[list[int]]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    cm = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(5, 5))
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(ax=ax, colorbar=False)
    ax.set_title(f"Confusion matrix ({title})")
    save_figure(fig, Path(out_dir) / "confusion.png")
    return cm.tolist()


def segmentation_plot(metrics: dict[str, Any], classes: Sequence[str], path: Path, *, title: str) -> None:
    """Write a bar chart of per-class Dice and IoU (from :func:`segmentation_metrics`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(classes))
    ax.bar(x - 0.2, np.nan_to_num(metrics["dice_per_class"]), 0.4, label="Dice")
    ax.bar(x + 0.2, np.nan_to_num(metrics["iou_per_class"]), 0.4, label="IoU")
    ax.set_xticks(x, list(classes), rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


def jsonable(x: Any) -> Any:
    """Plain JSON values: NaN -> None, numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return jsonable(x.item())
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
