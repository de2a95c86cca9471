"""Run widget: score the slide on screen with a trained xtpath model, in the background, filling a heatmap.

Choose a run folder (``xtpath train --out``), a device and a scope (the whole slide or the current field of
view) and press Run. A slide whose file holds no resolution needs its µm/px typed in (a typed value overrides
the file's, as a slides CSV's ``mpp`` column does). Regions are encoded in a worker thread; the heatmap, the
region scores and the slide-level probabilities update as regions finish. Cancel stops at the next chunk of
regions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_xt._layers import heatmap_layers, region_labels_layer


def _devices() -> list[str]:
    try:
        import torch

        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except Exception:  # pragma: no cover
        return ["cpu"]


class RunWidget(QWidget):
    """Score the current slide with an xtpath model (see module docstring)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker: Any = None
        self.state = "idle"  # idle | running | done | cancelled | error
        self.last_update: Any = None
        self._scored: Any = None  # the slide layer of the last run, and what its results are called
        self._label = ""
        self._slide_wh: tuple[float, float] | None = None  # level-0 size of the slide scored: heatmaps stop there
        # a result line about a slide that is no longer open would be read as the new slide's
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("run folder written by xtpath train")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.model_edit)
        row.addWidget(browse)
        self.device = QComboBox()
        self.device.addItems(_devices())
        self.scope = QComboBox()
        self.scope.addItems(["whole slide", "field of view"])
        self.mpp_edit = QLineEdit()
        self.mpp_edit.setPlaceholderText("from the slide file")
        self.mpp_edit.setToolTip("Microns per level-0 pixel, for slides whose file does not say "
                                 "(about 0.25 at 40x, 0.5 at 20x); overrides the file's value")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.status = QLabel("Open a slide, choose a model and press Run.")
        self.status.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Model", row)
        form.addRow("Device", self.device)
        form.addRow("Scope", self.scope)
        form.addRow("µm/px", self.mpp_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.result)
        lay.addStretch(1)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "xtpath run folder")
        if d:
            self.model_edit.setText(d)

    def slide_layer(self) -> Any:
        """The slide to score: the selected layer if it is a slide, else the first slide layer."""
        active = self.viewer.layers.selection.active
        if active is not None and "xtpath_slide" in active.metadata:
            return active
        for layer in self.viewer.layers:
            if "xtpath_slide" in layer.metadata:
                return layer
        return None

    def field_of_view(self, layer: Any) -> tuple[float, float, float, float]:
        """Level-0 ``(x, y, w, h)`` of what the canvas shows."""
        cam = self.viewer.camera
        canvas = getattr(self.viewer, "canvas", None)  # napari >= 0.9: viewer.canvas.size; before: private
        h_px, w_px = canvas.size if hasattr(canvas, "size") else self.viewer._canvas_size  # screen px (h, w)
        cy, cx = cam.center[-2:]
        half_w, half_h = w_px / cam.zoom / 2, h_px / cam.zoom / 2
        mx, my = layer.metadata["mpp"] or (1.0, 1.0)
        return ((cx - half_w) / mx + 0.5, (cy - half_h) / my + 0.5, 2 * half_w / mx, 2 * half_h / my)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    # -- run ----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Start scoring in a worker thread."""
        from napari.qt.threading import create_worker

        layer = self.slide_layer()
        if layer is None:
            self._fail("no slide open: open a slide (File > Open) first")
            return
        folder = self.model_edit.text().strip()
        if not folder or not Path(folder).is_dir():
            self._fail("choose the run folder of a trained model")
            return
        try:
            from xtpath.score import load_run

            sm = load_run(folder, self.device.currentText())
        except Exception as e:
            self._fail(str(e))
            return
        box = self.field_of_view(layer) if self.scope.currentText() == "field of view" else None
        mpp = layer.metadata.get("mpp")
        read_mpp = self._read_mpp(layer, mpp)
        if read_mpp is None:
            return
        self._slide_mpp = tuple(mpp) if mpp else (1.0, 1.0)  # the slide layer's scale: results are drawn on it
        wh = layer.metadata.get("level0_wh")
        self._slide_wh = (float(wh[0]), float(wh[1])) if wh else None
        # results are named after the slide and scope: runs on two slides, or on the whole slide and a field of
        # view, keep their own layers instead of overwriting each other's
        self._scored, self._label = layer, layer.name + (" (field of view)" if box else "")
        self._target = 1 if len(sm.classes) == 2 else None
        self._drop_stale_results(sm.classes)
        self.state, self.last_update = "running", None
        self.progress.setValue(0)
        self.status.setText(f"scoring {layer.name} with {Path(folder).name}…")
        self.result.setText("")
        self._set_running(True)

        def job():
            from xtpath.score import iter_score_slide

            yield from iter_score_slide(sm, layer.metadata["xtpath_slide"], mpp=read_mpp, box_xywh=box)

        # handlers given at creation: without an "errored" one, napari adds its own that re-raises (a pop-up
        # with a traceback for a slide without mpp); the widget's one line is the whole message
        self.worker = create_worker(job, _connect={"yielded": self._on_update,
                                                   "errored": lambda e: self._fail(str(e)),
                                                   "finished": self._on_finished}, _start_thread=False)
        self.worker.start()

    def _read_mpp(self, layer: Any, mpp: Any) -> float | None:
        """The µm/px to score at: the field's value, else the file's; ``None`` (and the status says why) when
        neither gives one."""
        text = self.mpp_edit.text().strip()
        if text:
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not value > 0 or value == float("inf"):
                self._fail(f"µm/px must be a positive number (e.g. 0.25 at 40x, 0.5 at 20x), got {text!r}")
                return None
            return value
        if not mpp:
            self._fail(f"{layer.name} has no µm/px in its file: type it in the µm/px field (e.g. 0.25 at 40x, "
                       "0.5 at 20x) and press Run again")
            return None
        return float(mpp[0])

    def cancel(self) -> None:
        if self.worker is not None and self.state == "running":
            self.state = "cancelled"
            self.worker.quit()
            self.status.setText("cancelling…")

    def _fail(self, msg: str) -> None:
        self.state = "error"
        self.status.setText(f"error: {msg}")
        self._set_running(False)

    def _on_finished(self) -> None:
        self._set_running(False)
        u = self.last_update
        whole = u is not None and u.done == u.total  # a Cancel after the last region leaves a whole result
        closed = self._scored not in self.viewer.layers
        if not closed and (self.state == "running" or (self.state == "cancelled" and whole)):
            self.state = "done"
            self.status.setText(f"done: {self._label}, {u.total if u else 0} regions")
        elif closed and self.state in ("running", "cancelled"):
            self.state = "cancelled"
            self.status.setText(f"cancelled: {self._label} was closed")
            self.result.setText("")
        elif self.state == "cancelled":
            self.status.setText(f"cancelled after {u.done if u else 0} regions")

    def _on_layer_removed(self, event: Any) -> None:
        if event.value is not self._scored:
            return
        if self.state == "running":  # the slide was closed mid-run: stop, and add no more result layers
            self.cancel()
            self.status.setText(f"cancelling: {self._label} was closed…")
        self.result.setText("")

    def _result_names(self, classes: list[str]) -> set[str]:
        """The layers a run of a model with these classes makes for the current label."""
        shown = [classes[self._target]] if self._target is not None else classes
        return {f"{self._label}: P({c})" for c in shown} | {f"{self._label}: region scores"}

    def _drop_stale_results(self, classes: list[str]) -> None:
        """Remove this label's result layers that a run with these classes will not replace (another model's
        classes): left, they would sit beside the new results under the same slide's name."""
        keep = self._result_names(classes)
        for layer in list(self.viewer.layers):
            md = layer.metadata or {}
            if layer.name.startswith(f"{self._label}: ") and layer.name not in keep and \
                    (md.get("xtpath_heatmap") or md.get("xtpath_regions")):
                self.viewer.layers.remove(layer)

    def _replace_layer(self, data: Any, kwargs: dict[str, Any], kind: str) -> None:
        name = kwargs["name"]
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            for key in ("scale", "translate"):
                setattr(layer, key, kwargs[key])
            layer.metadata = kwargs["metadata"]  # classes, region size, slide: what exports read
            if kind == "image":
                layer.reset_contrast_limits_range()
                layer.contrast_limits = kwargs["contrast_limits"]
            if kind == "labels":
                layer.features = kwargs["features"]
            return
        getattr(self.viewer, f"add_{kind}")(data, **kwargs)

    def _on_update(self, u: Any) -> None:
        self.last_update = u
        self.progress.setValue(int(100 * u.done / max(1, u.total)))
        if u.region_probs is None or self._scored not in self.viewer.layers:  # the slide was closed
            return
        n = len(u.region_probs)
        cells, coords = np.asarray(u.cells[:n]), np.asarray(u.coords[:n])
        only = [self._target] if self._target is not None else None
        layers = [*heatmap_layers(cells, u.region_probs, u.classes, u.region_size, self._slide_mpp, only=only,
                                  slide_wh=self._slide_wh),
                  region_labels_layer(cells, coords, u.region_probs, u.classes, u.region_size, self._slide_mpp)]
        for data, kwargs, kind in layers:
            if self._slide_wh is not None:  # exports cut at this slide's border, whatever slide is open then
                kwargs["metadata"]["slide_wh"] = list(self._slide_wh)
            self._replace_layer(data, {**kwargs, "name": f"{self._label}: {kwargs['name']}"}, kind)
        probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(u.classes, u.slide_probs))
        final = " (final)" if u.done == u.total else f" (from {u.done}/{u.total} regions)"
        self.result.setText(f"{self._label}: {probs}{final}")
