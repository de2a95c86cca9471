"""Peak memory of one end-to-end training step: bounded (chunked, exact gradient) vs plain backpropagation.

Synthetic slides of growing size (4k², 16k², 64k² px at 0.5 µm/px, tiled JPEG of real H&E texture, every region
tissue) are cut into 256-px regions at 2 µm/px (1024 level-0 px: 16, 256 and 4096 regions); one optimizer step
of the xT model (test_convnext region encoder + a small Mamba context) runs end to end through every region.
Each configuration runs in its own process, which reports its peak resident memory (``ru_maxrss``).

Target: bounded mode's peak at the largest slide <= 1.5x its peak at the smallest. Prints both curves and
writes JSON to benchmarks/results/.

    python benchmarks/e2e_memory.py                  # 4k, 16k, 64k (plain backprop skipped where it cannot fit)
    python benchmarks/e2e_memory.py --sizes 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_slide(path: Path, side: int) -> None:
    """A ``side`` x ``side`` px slide at 0.5 µm/px tiled with demo H&E textures; 4x pyramid levels."""
    import tifffile

    from xtpath.demo_data import _load_textures
    from xtpath.io.tiffwriter import downsample2

    tex = _load_textures()
    tiles = tex["dense"][:8] + tex["pink"][:8]
    levels = [(side, 1)]
    while levels[-1][0] // 4 >= 512:
        levels.append((levels[-1][0] // 4, levels[-1][1] * 4))

    def it(w: int, f: int):
        small = tiles
        for _ in range(int(np.log2(f))):
            small = [downsample2(np.tile(t, (2, 2, 1))) for t in small]
        for ty in range(0, w, 256):
            for tx in range(0, w, 256):
                yield small[(ty // 256 * 5 + tx // 256 * 3) % len(small)]

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (w, f) in enumerate(levels):
            res = 1e4 / (0.5 * f)
            tw.write(it(w, f), shape=(w, w, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 85}, subfiletype=1 if i else 0,
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)


def child(slide: str, mode: str, chunk: int) -> None:
    """One end-to-end optimizer step; prints JSON with peak RSS and timing."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    from xtpath.e2e import EndToEnd
    from xtpath.io import SlideRow
    from xtpath.models import XTModel
    from xtpath.train import _loss, _model_config, _Prepared, load_config

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.set_num_threads(2)
    row = SlideRow(slide_id="s", path=Path(slide), label="a", line=2)
    cfg = load_config(None, {"mode": "end2end", "e2e_backprop": mode, "e2e_chunk": chunk, "device": "cpu",
                             "encoder": "test_convnext", "encoder_px": 256, "region_px": 256, "target_mpp": 2.0,
                             "min_tissue": 0.1, "context_options": {"d_model": 64, "n_layers": 2},
                             "augment": False})
    prep = _Prepared([row], ["a", "b"], [0], [], [], (), {})
    runner = EndToEnd(prep, cfg, torch.device("cpu"))
    model = XTModel(_model_config(cfg, runner.feature_shape, 2))
    params = list(model.parameters()) + runner.encoder_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    view = runner.train_dataset(None)
    runner.train_mode()
    n = len(runner.plans.plan(0)[1])
    t0 = time.perf_counter()
    loss = runner.step(model, view, 0, lambda out, item: _loss(cfg, out, item, None))
    opt.step()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"regions": n, "peak_rss_mb": peak / 1024, "base_rss_mb": base_rss / 1024,
                      "seconds": dt, "loss": loss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["bounded", "full"], choices=["bounded", "full"])
    ap.add_argument("--plain-limit-gb", type=float, default=12.0,
                    help="skip plain backprop where the projection from smaller sizes exceeds this")
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "MODE", "CHUNK"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e_memory.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    results: dict[str, list[dict]] = {"bounded": [], "full": []}
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            slide = Path(tmp) / f"s{side}.tif"
            t0 = time.perf_counter()
            write_slide(slide, side)
            print(f"wrote {side}x{side} px slide in {time.perf_counter() - t0:.0f} s", flush=True)
            for mode in args.modes:
                prev = results[mode]
                if mode == "full" and len(prev) >= 2:
                    # memory grows linearly with regions: project before trying
                    (r1, m1), (r2, m2) = [(p["regions"], p["peak_rss_mb"]) for p in prev[-2:]]
                    n_next = (side // 1024) ** 2
                    projected = m2 + (m2 - m1) / max(1, r2 - r1) * (n_next - r2)
                    if projected / 1024 > args.plain_limit_gb:
                        results[mode].append({"side": side, "regions": n_next, "skipped": True,
                                              "projected_peak_rss_mb": projected})
                        print(f"  {mode:8s} {side:>6}²: skipped, projected {projected / 1024:.1f} GB", flush=True)
                        continue
                r = subprocess.run([sys.executable, __file__, "--child", str(slide), mode, str(args.chunk)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    results[mode].append({"side": side, "failed": r.stderr[-500:]})
                    print(f"  {mode:8s} {side:>6}²: FAILED {r.stderr[-300:]}", flush=True)
                    continue
                d = json.loads(r.stdout.strip().splitlines()[-1])
                d["side"] = side
                results[mode].append(d)
                print(f"  {mode:8s} {side:>6}²: {d['regions']:>5} regions, peak {d['peak_rss_mb']:.0f} MB, "
                      f"{d['seconds']:.1f} s", flush=True)
    b = [x for x in results["bounded"] if "peak_rss_mb" in x]
    ratio = b[-1]["peak_rss_mb"] / b[0]["peak_rss_mb"] if len(b) >= 2 else float("nan")
    print(f"\n{'slide':>8} {'regions':>8} {'bounded MB':>11} {'plain MB':>10}")
    for xb, xf in zip(results["bounded"], results["full"] or [{}] * len(results["bounded"])):
        pf = f"{xf['peak_rss_mb']:.0f}" if "peak_rss_mb" in xf else (
            f"(>{xf['projected_peak_rss_mb']:.0f})" if xf.get("skipped") else "failed" if xf else "not run")
        print(f"{xb['side']:>7}² {xb.get('regions', 0):>8} {xb.get('peak_rss_mb', float('nan')):>11.0f} {pf:>10}")
    print(f"bounded peak at largest / smallest: {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "bounded_ratio": ratio, "target": 1.5,
                                    "met": ratio <= 1.5, "chunk": args.chunk,
                                    "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
