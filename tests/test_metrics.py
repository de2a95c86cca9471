"""Metrics and their plots (scikit-learn underneath): what is written when a metric is undefined."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from xtpath.metrics import classification_metrics, roc_and_confusion_plots


def test_plots_of_two_classes_and_of_one(tmp_path):
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    cm = roc_and_confusion_plots(probs, labels, ["neg", "pos"], tmp_path)
    assert cm == [[1, 0], [1, 2]]  # rows: truth, columns: prediction
    for name in ("roc.png", "confusion.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    m = classification_metrics(probs, labels, 2)
    assert m["accuracy"] == 0.75 and m["auc"] == 1.0 and m["balanced_accuracy"] == (1.0 + 2 / 3) / 2
    # one class only: no ROC curve exists, so no roc.png (and an earlier one goes); the confusion matrix stays
    cm = roc_and_confusion_plots(probs[1:], labels[1:], ["neg", "pos"], tmp_path)
    assert cm == [[0, 0], [1, 2]]
    assert not (tmp_path / "roc.png").exists() and (tmp_path / "confusion.png").exists()
    m = classification_metrics(probs[1:], labels[1:], 2)
    assert math.isnan(m["auc"]) and math.isnan(m["balanced_accuracy"]) and m["accuracy"] == 2 / 3


def test_three_classes_auc_is_sklearns_and_stays_defined_without_a_rare_class():
    import warnings

    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], 30)
    labels = np.arange(30) % 3
    m = classification_metrics(probs, labels, 3)
    assert math.isclose(m["auc"], roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    # a part without class 2 (one slide of it in the cohort, in training): the mean AUC of classes 0 and 1
    keep = labels != 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing leaks from scikit-learn
        m = classification_metrics(probs[keep], labels[keep], 3)
    want = np.mean([roc_auc_score(labels[keep] == c, probs[keep][:, c]) for c in (0, 1)])
    assert math.isclose(m["auc"], want) and np.isfinite(m["balanced_accuracy"])
