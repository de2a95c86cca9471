"""Regenerate the bundled sample (maintainers): ``python -m napari_xt._make_sample``.

Writes a small demo dataset, trains a tiny xT model on it (random-init test_convnext encoder, small Mamba),
and scores one slide; copies the slide, the run and the score folder into ``sample/``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from napari_xt._sample_data import SAMPLE


def main() -> None:
    from xtpath.demo_data import DemoSpec, make_demo_dataset
    from xtpath.io import read_slides_csv
    from xtpath.score import score_slides
    from xtpath.train import load_config, train

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = make_demo_dataset(tmp / "data", DemoSpec(n_slides=12, grid=6, seed=11))
        cfg = load_config(None, {"device": "cpu", "epochs": 4, "encoder": "test_convnext", "encoder_px": 64,
                                 "region_px": 128, "target_mpp": 1.0, "lr": 3e-3,
                                 "context_options": {"d_model": 32, "n_layers": 2}, "cache": str(tmp / "cache")})
        train(csv, tmp / "run", cfg, show_progress=False, log=print)
        rows = read_slides_csv(csv)
        row = next(r for r in rows if r.label == "touch")
        score_slides([row], tmp / "run", tmp / "scored", cache_dir=tmp / "cache")
        if SAMPLE.exists():
            shutil.rmtree(SAMPLE)
        (SAMPLE / "run").mkdir(parents=True)
        shutil.copy(row.path, SAMPLE / "demo_slide.tif")
        for name in ("model.safetensors", "model.json", "classes.json", "config.yaml", "extract.json"):
            shutil.copy(tmp / "run" / name, SAMPLE / "run" / name)
        ext = json.loads((SAMPLE / "run" / "extract.json").read_text())
        ext["cache"] = ""
        (SAMPLE / "run" / "extract.json").write_text(json.dumps(ext, indent=2) + "\n")
        out = SAMPLE / "scored" / "demo_slide"
        out.mkdir(parents=True)
        for name in ("prediction.json", "regions.h5", "regions.geojson", "heatmap.png"):
            shutil.copy(tmp / "scored" / row.slide_id / name, out / name)
        rec = json.loads((out / "prediction.json").read_text())
        rec["slide_id"], rec["slide_path"], rec["model"] = "demo_slide", "../../demo_slide.tif", "../../run"
        (out / "prediction.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {SAMPLE}")


if __name__ == "__main__":
    main()
