"""The command line on a CUDA GPU, checked against the same commands on the CPU.

Writes a small demo dataset (generated slides, offline), then runs, as a user would, in subprocesses:

1. ``xtpath extract`` on GPU 0 (bf16 autocast) and on the CPU: the largest relative difference of the cached
   features of each slide;
2. ``xtpath train`` (Mamba context; the mamba-ssm kernels when installed) on the GPU from the GPU cache;
3. ``xtpath score`` of the test slides on GPU 0 and on the CPU with that model: the largest difference of
   the predicted probabilities;
4. ``xtpath train --mode end2end`` for one epoch on the GPU (the region encoder trained too).

Prints each step's wall time and writes JSON (``--out``). Exit status 1 if a command fails or a difference is
above its tolerance (features 5e-2 relative, bf16 against float32; probabilities 2e-2).

Usage::

    python benchmarks/gpu_pipeline.py --work /tmp/gpu_pipeline --out /tmp/gpu_pipeline.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FEATURE_TOL = 5e-2
PROB_TOL = 2e-2


def _xtpath(log: list[dict], name: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "xtpath", *map(str, args)], capture_output=True, text=True, env=env,
                       check=False)
    seconds = time.perf_counter() - t0
    log.append({"step": name, "seconds": round(seconds, 2), "returncode": r.returncode,
                "stderr_tail": r.stderr[-1500:] if r.returncode else ""})
    print(f"{name}: exit {r.returncode} in {seconds:.1f} s", flush=True)
    if r.returncode:
        print(r.stderr[-3000:], flush=True)
    return r


def _probabilities(folder: Path) -> dict[str, list[float]]:
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("p_")] if rows else []
    return {r["slide_id"]: [float(r[c]) for c in cols] for r in rows if cols and r[cols[0]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder.")
    parser.add_argument("--n-slides", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--gpu", default="0", help="GPU number; 'cpu' runs the GPU steps on the CPU too (to try "
                        "this script on a machine without one).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_pipeline.json")
    args = parser.parse_args(argv)

    import torch

    from xtpath.cache import load_features
    from xtpath.demo import ENCODER
    from xtpath.demo_data import DemoSpec, make_demo_dataset

    gpu_devices, gpu_device = (args.gpu, f"cuda:{args.gpu}") if args.gpu != "cpu" else ("cpu", "cpu")
    if gpu_device != "cpu" and not torch.cuda.is_available():
        print("gpu_pipeline: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    work = args.work
    slides = make_demo_dataset(work / "data", DemoSpec(n_slides=args.n_slides, grid=8))
    enc = ["--encoder", ENCODER["encoder"], "--encoder-px", ENCODER["encoder_px"],
           "--region-px", ENCODER["region_px"], "--target-mpp", ENCODER["target_mpp"]]
    tissue = ["--min-tissue", 0.25]  # extract's option; train end2end uses its default (the same 0.25)
    log: list[dict] = []
    device = torch.cuda.get_device_name() if gpu_device != "cpu" else "cpu"
    result: dict = {"device": device, "torch": torch.__version__, "steps": log}
    ok = True
    ok &= _xtpath(log, "extract on GPU 0", "extract", slides, "--out", work / "cache_gpu", *enc, *tissue,
                  "--devices", gpu_devices).returncode == 0
    ok &= _xtpath(log, "extract on CPU", "extract", slides, "--out", work / "cache_cpu", *enc, *tissue,
                  "--devices", "cpu").returncode == 0
    if ok:
        diffs = {}
        for h5 in sorted((work / "cache_cpu").glob("*.h5")):
            cpu = load_features(h5).features.astype(np.float32)
            gpu = load_features(work / "cache_gpu" / h5.name).features.astype(np.float32)
            diffs[h5.stem] = float(np.abs(gpu - cpu).max() / max(np.abs(cpu).max(), 1e-12))
        result["feature_max_rel_diff"] = max(diffs.values())
        ok &= result["feature_max_rel_diff"] <= FEATURE_TOL
        print(f"features GPU (bf16) vs CPU: largest relative difference {result['feature_max_rel_diff']:.3g}")
    run = work / "run_gpu"
    ok &= _xtpath(log, "train (cached) on GPU", "train", slides, "--out", run, "--cache", work / "cache_gpu",
                  "--context", "mamba", "--epochs", args.epochs, "--device", gpu_device).returncode == 0
    if (run / "model.safetensors").exists():
        for where, devices in (("gpu", gpu_devices), ("cpu", "cpu")):
            ok &= _xtpath(log, f"score on {where}", "score", slides, "--model", run, "--out", work / f"scored_{where}",
                          "--cache", work / f"cache_{where}", "--devices", devices).returncode == 0
        try:
            gpu, cpu = _probabilities(work / "scored_gpu"), _probabilities(work / "scored_cpu")
            common = sorted(set(gpu) & set(cpu))
            result["scored_slides"] = len(common)
            result["probability_max_abs_diff"] = max(
                float(np.abs(np.subtract(gpu[s], cpu[s])).max()) for s in common) if common else None
            ok &= bool(common) and result["probability_max_abs_diff"] <= PROB_TOL
            print(f"scores GPU vs CPU on {len(common)} slides: largest difference "
                  f"{result['probability_max_abs_diff']}")
        except (OSError, ValueError, KeyError) as e:
            print(f"could not compare the scores: {e}")
            ok = False
    ok &= _xtpath(log, "train end2end on GPU", "train", slides, "--out", work / "run_e2e", "--mode", "end2end",
                  *enc, "--context", "mamba", "--epochs", 1, "--device", gpu_device).returncode == 0
    result["ok"] = bool(ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
