"""Sample data: a small demo slide (real H&E pixels) with a prediction precomputed by a tiny bundled model."""

from __future__ import annotations

from pathlib import Path

from napari_xt._layers import LayerData, score_folder_layers

SAMPLE = Path(__file__).parent / "sample"


def sample_paths() -> dict[str, Path]:
    """Where the bundled files are: the slide, the tiny trained run and the score folder."""
    return {"slide": SAMPLE / "demo_slide.tif", "run": SAMPLE / "run", "scored": SAMPLE / "scored" / "demo_slide"}


def make_sample_data() -> list[LayerData]:
    """The demo slide with its heatmap and region scores (offline)."""
    return score_folder_layers(sample_paths()["scored"])
