"""Extraction throughput: the full pipeline's regions/s over the encoder alone, in one process and one run.

A synthetic pyramidal slide (real H&E pixels from the bundled CMU slide, tiled JPEG, Aperio-like 4x levels) with
tens of thousands of regions is written with tifffile; then

* encoder alone: the same encoder on random uint8 batches of the same shape (no reading, no writing), timed
  before and after the pipeline and averaged;
* full pipeline: ``xtpath.extract.extract_slides`` (tissue mask, region grid, DataLoader workers reading and
  resampling regions, encoder, HDF5 writing).

Target: pipeline / encoder >= 0.9. Prints the table and writes JSON to benchmarks/results/.

    python benchmarks/extract_throughput.py            # ~20k regions; a few minutes on 2 cores
    python benchmarks/extract_throughput.py --grid 40 # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_slide(path: Path, grid: int, region_px: int, slide_mpp: float, target_mpp: float) -> tuple[int, int]:
    """A (grid*region) x (grid*region) region slide at ``slide_mpp``, levels 1/4, 1/16, ... as top-level pages."""
    import tifffile

    from xtpath.io import open_slide
    from xtpath.io.tiffwriter import downsample2

    scale = target_mpp / slide_mpp
    side = int(round(grid * region_px * scale))
    src = open_slide(ROOT / "tests" / "data" / "CMU-1-Small-Region.svs")
    rng = np.random.default_rng(0)
    tiles = []
    while len(tiles) < 24:  # tissue-rich 256-px pieces of a real H&E slide
        x, y = rng.integers(0, 2220 - 256), rng.integers(0, 2967 - 256)
        t = src.read_region((int(x), int(y)), (256, 256), level=0)
        if (t.mean(axis=2) < 200).mean() > 0.7:
            tiles.append(t)
    levels = [(side, side, 1)]
    while levels[-1][0] // 4 >= 512:
        levels.append((levels[-1][0] // 4, levels[-1][1] // 4, levels[-1][2] * 4))

    def tile_iter(w: int, h: int, f: int):
        small = tiles
        for _ in range(int(np.log2(f))):
            small = [downsample2(np.tile(t, (2, 2, 1))) for t in small]  # keep 256-px tiles of the shrunk texture
        for ty in range(0, h, 256):
            for tx in range(0, w, 256):
                yield small[(ty // 256 * 7 + tx // 256 * 3) % len(small)]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (w, h, f) in enumerate(levels):
            res = 1e4 / (slide_mpp * f)
            tw.write(tile_iter(w, h, f), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, subfiletype=1 if i else 0,
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
    return side, side


def encoder_alone(cfg, n_regions: int, read_px: int, device: str = "cpu") -> float:
    """Regions/s of the encoder on random uint8 batches (same batch size, same input shape)."""
    import torch

    from xtpath.models.encoders import build_region_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = build_region_encoder(cfg.encoder, cfg.weights, features=cfg.features, input_px=cfg.encoder_px,
                                   device=device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (cfg.batch_size, read_px, read_px, 3), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        enc(batch)  # warm-up
        done, t0 = 0, time.perf_counter()
        while done < n_regions:
            out = enc(batch)
            out.float().cpu().numpy()
            done += len(batch)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, default=142, help="regions per side (142 -> 20,164 regions)")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--encoder-px", type=int, default=224)
    ap.add_argument("--region-px", type=int, default=224)
    ap.add_argument("--slide-mpp", type=float, default=0.25)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--alone-regions", type=int, default=2048, help="regions timed for the encoder alone")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extract_throughput.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from xtpath.extract import ExtractConfig, extract_slides
    from xtpath.io import SlideRow

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        slide = tmp / "synthetic.tif"
        w, h = write_slide(slide, args.grid, args.region_px, args.slide_mpp, args.target_mpp)
        print(f"wrote {w}x{h} px synthetic slide in {time.perf_counter() - t0:.0f} s")
        cfg = ExtractConfig(encoder=args.encoder, encoder_px=args.encoder_px, region_px=args.region_px,
                            target_mpp=args.target_mpp, batch_size=args.batch_size, num_workers=args.workers,
                            min_tissue=0.25)
        alone_before = encoder_alone(cfg, args.alone_regions, args.encoder_px)
        row = SlideRow(slide_id="synthetic", path=slide, mpp=args.slide_mpp)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            summary = extract_slides([row], tmp / "cache", cfg)
        wall = time.perf_counter() - t0
        if summary.failed:
            raise SystemExit(f"extraction failed: {summary.failed}")
        pipeline = summary.regions / wall
        alone_after = encoder_alone(cfg, args.alone_regions, args.encoder_px)
    alone = (alone_before + alone_after) / 2  # before and after: the machine's speed drifts over minutes
    ratio = pipeline / alone
    result = {
        "regions": summary.regions, "slide_px": [w, h], "encoder": args.encoder, "encoder_px": args.encoder_px,
        "region_px": args.region_px, "slide_mpp": args.slide_mpp, "target_mpp": args.target_mpp,
        "batch_size": args.batch_size, "workers": cfg.num_workers, "torch_threads": torch.get_num_threads(),
        "encoder_alone_regions_per_s": alone, "encoder_alone_before_after": [alone_before, alone_after],
        "pipeline_regions_per_s": pipeline, "pipeline_seconds": wall,
        "ratio": ratio, "target": 0.9, "met": ratio >= 0.9, "cpus": os.cpu_count(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{'regions':>10} {'encoder alone':>16} {'full pipeline':>16} {'ratio':>7}")
    print(f"{summary.regions:>10} {alone:>12.1f} r/s {pipeline:>12.1f} r/s {ratio:>7.3f}  (target >= 0.9: "
          f"{'met' if ratio >= 0.9 else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
