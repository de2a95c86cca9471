"""The Mamba context encoder on a CUDA GPU: mamba-ssm's fused kernels against our PyTorch scan, same weights.

Needs a CUDA device; the kernel rows need mamba-ssm (the ``gpu`` extra). For each length (default 16k, 32k
and 64k tokens, laid out on a near-square grid) the default context (width 256, 4 layers, cross scan, 2-D
conv) runs on both paths with one set of weights:

- the largest difference of the outputs, and of the gradients of the input features, between the two paths,
  relative to the largest value (float32);
- time of a forward+backward pass (``loss = tokens.square().mean() + pooled.sum()``) in float32 and under bf16
  autocast (what ``xtpath train`` uses on a GPU), and of a forward pass alone in inference mode (what
  ``xtpath score`` does), the median of ``--repeats`` runs after one warm-up;
- peak GPU memory of each (``torch.cuda.max_memory_allocated``).

Usage::

    python benchmarks/gpu_context.py                         # 16k, 32k, 64k
    python benchmarks/gpu_context.py --lengths 4096 --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch


def _grid(length: int) -> torch.Tensor:
    cols = math.ceil(math.sqrt(length))
    idx = torch.arange(length)
    return torch.stack([idx // cols, idx % cols], dim=1)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` over ``repeats`` runs after a warm-up, and the peak memory (GiB) of one run."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def measure(length: int, d_model: int, layers: int, repeats: int, kernel: bool, ours_train_max: int) -> dict:
    from xtpath.models import ContextConfig, build_context_encoder

    torch.manual_seed(0)
    paths = {"ours": "torch", **({"kernel": "cuda"} if kernel else {})}
    models = {}
    for name, backend in paths.items():
        models[name] = build_context_encoder(ContextConfig(name="mamba", d_model=d_model, n_layers=layers,
                                                           backend=backend)).cuda()
    if kernel:
        models["kernel"].load_state_dict(models["ours"].state_dict())
    pos = _grid(length).cuda()
    side = (int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1)
    x0 = torch.randn(length, d_model, generator=torch.Generator().manual_seed(1)).cuda()
    row: dict = {"tokens": length, "grid": list(side), "d_model": d_model, "layers": layers}
    outs = {}
    for name, model in models.items():
        x = x0.clone().requires_grad_()
        out = model(x, pos, (1, 1))
        (out.tokens.square().mean() + out.pooled.sum()).backward()
        outs[name] = (out.tokens.detach(), x.grad.detach())
        model.zero_grad(set_to_none=True)

        def step(model=model, amp=False):
            x = x0.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x, pos, (1, 1))
                loss = out.tokens.float().square().mean() + out.pooled.float().sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        def infer(model=model):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x0, pos, (1, 1))

        if name == "kernel" or length <= ours_train_max:
            row[f"{name}_fwd_bwd_s"], row[f"{name}_fwd_bwd_gib"] = _timed(step, repeats)
            row[f"{name}_fwd_bwd_bf16_s"], row[f"{name}_fwd_bwd_bf16_gib"] = _timed(lambda: step(amp=True), repeats)
        row[f"{name}_infer_bf16_s"], row[f"{name}_infer_bf16_gib"] = _timed(infer, repeats)
    if kernel:
        row["max_rel_err_tokens"] = _rel(outs["kernel"][0], outs["ours"][0])
        row["max_rel_err_input_grad"] = _rel(outs["kernel"][1], outs["ours"][1])
        if "ours_fwd_bwd_s" in row:
            row["speedup_fwd_bwd"] = row["ours_fwd_bwd_s"] / row["kernel_fwd_bwd_s"]
        row["speedup_infer_bf16"] = row["ours_infer_bf16_s"] / row["kernel_infer_bf16_s"]
    del models, outs
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="*", type=int, default=[16384, 32768, 65536])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ours-train-max", type=int, default=1 << 30,
                        help="Time our scan's forward+backward only up to this many tokens (it is checked against "
                             "the kernels at every length; on a GPU it takes seconds per pass at 16k).")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "gpu_context.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_context: no CUDA device; run it on a GPU machine", file=sys.stderr)
        return 2
    from xtpath.models.kernels import mamba_ssm_installed

    kernel = mamba_ssm_installed()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, mamba-ssm kernels: {kernel}")
    rows = []
    for length in args.lengths:
        row = measure(length, args.d_model, args.layers, args.repeats, kernel, args.ours_train_max)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after each length: a time limit keeps what was done
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=2))
    cols = ["tokens", "ours_fwd_bwd_s", "kernel_fwd_bwd_s", "ours_fwd_bwd_bf16_s", "kernel_fwd_bwd_bf16_s",
            "ours_infer_bf16_s", "kernel_infer_bf16_s", "ours_fwd_bwd_gib", "kernel_fwd_bwd_gib",
            "max_rel_err_tokens", "max_rel_err_input_grad"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
