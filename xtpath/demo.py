"""``xtpath demo``: the whole pipeline on generated slides, offline, in minutes on a laptop CPU.

1. write a labelled dataset of pyramidal TIFF slides made of real H&E pixels (:mod:`xtpath.demo_data`): the
   label (``touch``/``apart``) depends on how two tissue kinds are arranged over the whole slide;
2. extract region features (tissue mask, nested tokenization, a small timm encoder);
3. train the Mamba context model and the ``mean`` baseline on the cached features;
4. score the held-out test slides with both and write the reports, heatmaps and QuPath GeoJSON.

The region encoder is timm's tiny ``test_convnext`` with *random* weights (nothing can be downloaded here):
its features tell the two tissue textures apart by their colour statistics, which is all this task needs. On
real data use a pathology foundation model (``--encoder uni --weights pytorch_model.bin``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xtpath.demo_data import DemoSpec, check_spec, make_demo_dataset
from xtpath.extract import ExtractConfig, extract_slides
from xtpath.io import read_slides_csv
from xtpath.report import report
from xtpath.score import score_slides
from xtpath.train import load_config, train

__all__ = ["DemoSettings", "run_demo"]

ENCODER = {"encoder": "test_convnext", "encoder_px": 64, "region_px": 128, "target_mpp": 1.0}


@dataclass
class DemoSettings:
    """Size of the demo run."""

    n_slides: int = 60
    grid: int = 10
    epochs: int = 15
    seed: int = 0
    d_model: int = 32
    n_layers: int = 2


def run_demo(out_dir: str | os.PathLike[str], s: DemoSettings | None = None, *,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the two models' test metrics and where the outputs are."""
    s = s or DemoSettings()
    out = Path(out_dir)
    t0 = time.perf_counter()
    spec = DemoSpec(n_slides=s.n_slides, grid=s.grid, seed=s.seed)
    check_spec(spec)  # every setting is checked before the first step, not minutes into the run
    cfgs = {ctx: load_config(None, {"context": ctx, "cache": str(out / "cache"), "epochs": s.epochs,
                                    "accumulate": 1, "lr": 3e-3, "warmup_epochs": 1.0, "patience": s.epochs,
                                    "seed": s.seed, "device": "cpu", "monitor": "accuracy",
                                    "context_options": {"d_model": s.d_model, "n_layers": s.n_layers}})
            for ctx in ("mamba", "mean")}
    log(f"[1/4] writing {s.n_slides} demo slides to {out / 'data'}")
    csv = make_demo_dataset(out / "data", spec)
    rows = read_slides_csv(csv)
    log(f"[2/4] extracting region features ({ENCODER['encoder']}, random weights) into {out / 'cache'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ex = extract_slides(rows, out / "cache", ExtractConfig(**ENCODER, min_tissue=0.25, num_workers=0))
    if ex.failed:
        raise RuntimeError(f"demo extraction failed: {ex.failed}")
    results: dict[str, Any] = {}
    test_rows = [r for r in rows if r.split == "test"]
    for i, ctx in enumerate(("mamba", "mean")):
        run = out / f"run_{ctx}"
        log(f"[3/4] training the {ctx} context model ({s.epochs} epochs) into {run}")
        cfg = cfgs[ctx]
        resume = (run / "last").exists()
        train(csv, run, cfg, resume=resume, show_progress=False, log=lambda m: log(f"      {m}"))
        scored = out / f"scored_{ctx}"
        log(f"[4/4] scoring the {len(test_rows)} held-out test slides with {ctx} into {scored}")
        score_slides(test_rows, run, scored, cache_dir=out / "cache")
        rep = report(scored, csv)
        results[ctx] = {"accuracy": rep["metrics"]["accuracy"], "auc": rep["metrics"]["auc"],
                        "balanced_accuracy": rep["metrics"]["balanced_accuracy"], "run": str(run),
                        "scored": str(scored)}
    results["seconds"] = time.perf_counter() - t0
    results["n_test"] = len(test_rows)
    return results
