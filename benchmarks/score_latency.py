"""Scoring latency per slide from the feature cache, and the share of it spent outside the model.

For 1k, 10k and 50k regions: a cache file (1024-d pooled features, as UNI gives), a slide file to draw the
heatmap on, and context models of several sizes (xtpath's default Mamba, 4 layers of width 256 with four scan
orders; a small Mamba; ABMIL), random weights. Times
``xtpath.score.score_one`` (read the cache, run the model, write regions.h5, the QuPath GeoJSON, the heatmap PNG
and prediction.json) and, separately, the model forward alone on the same tensors.

Target: under 0.5 s per slide at 10k regions on CPU. Prints the table and writes JSON to benchmarks/results/.

    python benchmarks/score_latency.py
    python benchmarks/score_latency.py --regions 1000 10000 --contexts abmil:256x1 mean:256x1
    python benchmarks/score_latency.py --regions 10000 --contexts mamba:256x4 --threads 1 2   # scaling
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_case(folder: Path, n: int, dim: int) -> tuple[Path, Path]:
    """A slide (coarse, 8 µm/px, 64-px regions) with a square-ish region grid of ``n`` regions, and its cache."""
    import tifffile

    from xtpath.cache import SCHEMA_VERSION, CacheWriter
    from xtpath.tiling import RegionGrid

    side = int(math.ceil(math.sqrt(n)))
    px = side * 64
    slide = folder / f"slide_{n}.tif"
    tile = np.full((256, 256, 3), 200, np.uint8)

    def tiles(w: int):
        for _ in range(math.ceil(w / 256) ** 2):
            yield tile

    with tifffile.TiffWriter(slide, bigtiff=True) as tw:
        w, f = px, 1
        i = 0
        while True:
            res = 1e4 / (8.0 * f)
            tw.write(tiles(w), shape=(w, w, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", subfiletype=1 if i else 0, resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)
            if w // 4 < 256:
                break
            w, f, i = w // 4, f * 4, i + 1
    grid = np.array([(r, c) for r in range(side) for c in range(side)][:n], np.int64)
    regions = RegionGrid(coords=grid[:, ::-1] * 64, grid=grid, tissue=np.ones(n, np.float32),
                         region_size=(64.0, 64.0), region_px=64, encoder_px=64, target_mpp=8.0,
                         slide_mpp=(8.0, 8.0), slide_dimensions=(px, px), grid_shape=(side, side))
    settings = {"schema_version": SCHEMA_VERSION, "encoder": "synthetic", "weights_sha256": "none",
                "features_kind": "pooled", "encoder_px": 64, "mpp": [8.0, 8.0], "target_mpp": 8.0, "region_px": 64,
                "tissue": {}}
    cache = folder / f"slide_{n}.h5"
    feats = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    with CacheWriter(cache, regions, feature_shape=(dim,), settings=settings, name=f"slide_{n}") as wr:
        wr.write(0, feats)
    return slide, cache


def by_threads(fn, counts: list[int], repeats: int) -> dict[int, float]:
    """Median time of ``fn()`` with ``torch.set_num_threads(t)`` for each ``t`` (the thread count is put back)."""
    import torch

    before = torch.get_num_threads()
    out = {}
    try:
        for t in counts:
            torch.set_num_threads(t)
            fn()  # the fused kernels' thread pool is sized to the thread count: warm it up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[t] = float(np.median(times))
    finally:
        torch.set_num_threads(before)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--contexts", nargs="+", default=["mamba:256x4", "mamba:64x2", "abmil:256x1"],
                    help="context encoders to time, as name:widthxlayers (mamba:256x4 is xtpath's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[],
                    help="also time the model forward pass at these torch thread counts (e.g. 1 2) and print "
                         "the speed-up: how scoring scales with cores on a bigger machine")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "score_latency.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    import torch

    from xtpath.cache import load_features
    from xtpath.io import SlideRow
    from xtpath.models import ContextConfig, XTConfig, XTModel
    from xtpath.score import ScoreModel, _predict, score_one

    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = {n: make_case(tmp, n, args.dim) for n in args.regions}
        for spec in args.contexts:
            name, size = spec.split(":")
            width, layers = (int(v) for v in size.split("x"))
            torch.manual_seed(0)
            model = XTModel(XTConfig(in_dim=args.dim, num_classes=2,
                                     context=ContextConfig(name=name, d_model=width, n_layers=layers))).eval()
            sm = ScoreModel(tmp, [model], ["negative", "positive"], "classification",
                            {"encoder": "synthetic", "weights_sha256": "none", "features_kind": "pooled",
                             "encoder_px": 64})
            for n, (slide, cache) in cases.items():
                row = SlideRow(slide_id=f"s{n}", path=slide)
                sf = load_features(cache)
                score_one(sm, row, cache, tmp / "out")  # warm-up (imports, caches)
                totals, models = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    score_one(sm, row, cache, tmp / "out")
                    totals.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    _predict(sm, sf.features, sf.grid)
                    models.append(time.perf_counter() - t0)
                total, mod = float(np.median(totals)), float(np.median(models))
                r = {"context": spec, "regions": n, "total_s": total, "model_s": mod,
                     "outside_s": max(0.0, total - mod), "outside_share": max(0.0, total - mod) / total}
                if args.threads:
                    r["model_s_by_threads"] = by_threads(functools.partial(_predict, sm, sf.features, sf.grid),
                                                         args.threads, args.repeats)
                all_rows.append(r)
                print(f"{spec:>12} {n:>7} regions: {total:.3f} s per slide, model {mod:.3f} s, outside the model "
                      f"{r['outside_s']:.3f} s ({r['outside_share']:.0%})", flush=True)
                if args.threads:
                    bt = r["model_s_by_threads"]
                    lo = min(bt)
                    print(" " * 21 + "model forward by threads: " + ", ".join(
                        f"{t}: {s:.3f} s ({bt[lo] / s:.2f}x)" for t, s in bt.items()), flush=True)
    rows = all_rows
    ten = [r for r in rows if r["regions"] == 10000]
    met = {r["context"]: r["total_s"] < 0.5 for r in ten}
    print("target < 0.5 s at 10k regions: " + (", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items())
                                                or "not measured (add 10000 to --regions)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"contexts": args.contexts, "dim": args.dim, "threads": torch.get_num_threads(),
                                    "rows": rows, "target_s_at_10k": 0.5, "met": met,
                                    "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
