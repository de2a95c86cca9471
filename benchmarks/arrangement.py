"""Arrangement task: can a context encoder tell whether two marked regions touch?

Trains every context encoder (and every Mamba scan option) on tens of synthetic slides
(:func:`xtpath.models.synthetic.arrangement_slides`: 12x12 region grids with 10 % holes; each region a
random one of 8 random 32-d "tissue type" vectors plus noise; two regions of a ninth, marked type (a 3x
longer vector) that either share an edge or lie >= 3 apart) and prints held-out accuracy; writes the table as JSON (``--out``, default
``benchmarks/results/arrangement.json``).

Usage::

    python benchmarks/arrangement.py                 # all encoders and scan options, seeds 0 1 2
    python benchmarks/arrangement.py --seeds 0 --configs mamba-cross mean
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from xtpath.models import ContextConfig, XTConfig, XTModel
from xtpath.models.synthetic import SyntheticSlide, arrangement_slides

#: name -> context settings (d_model 32, 2 layers)
CONFIGS = {
    "mamba-cross": dict(name="mamba", scan="cross"),
    "mamba-cross-cls": dict(name="mamba", scan="cross", pool="cls"),
    "mamba-hilbert": dict(name="mamba", scan="hilbert"),
    "mamba-raster": dict(name="mamba", scan="raster"),
    "mamba-xt": dict(name="mamba", scan="xt"),
    "mamba-cross-noconv": dict(name="mamba", scan="cross", conv2d=0),
    "mamba-xt+conv": dict(name="mamba", scan="xt", conv2d=3),
    "transformer": dict(name="transformer", n_heads=4),
    "transformer-cls": dict(name="transformer", n_heads=4, pool="cls"),
    "abmil": dict(name="abmil", attn_dim=32),
    "mean": dict(name="mean"),
}


def train_and_score(context: ContextConfig, train: list[SyntheticSlide], test: list[SyntheticSlide],
                    epochs: int = 10, lr: float = 3e-3, accumulate: int = 1,
                    seed: int = 0) -> tuple[float, float]:
    """Train an XTModel on ``train`` and score both sets.

    One slide per forward pass, gradients accumulated over ``accumulate`` slides, AdamW with a one-cycle
    learning-rate schedule (10 % warm-up, cosine decay) and gradient clipping at norm 1.

    Returns
    -------
    (float, float)
        Accuracy on ``train`` and on ``test`` (fractions).
    """
    torch.manual_seed(seed)
    dim = train[0].features.shape[1]
    model = XTModel(XTConfig(in_dim=dim, num_classes=1, context=context))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = -(-len(train) // accumulate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        model.train()
        for step, i in enumerate(torch.randperm(len(train), generator=order).tolist()):
            s = train[i]
            logit = model(s.features, s.grid).logits
            loss = loss_fn(logit, torch.tensor([float(s.label)])) / accumulate
            loss.backward()
            if (step + 1) % accumulate == 0 or step + 1 == len(train):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                sched.step()

    @torch.no_grad()
    def accuracy(slides: list[SyntheticSlide]) -> float:
        model.eval()
        hits = [(model(s.features, s.grid).logits.item() > 0) == bool(s.label) for s in slides]
        return sum(hits) / len(hits)

    return accuracy(train), accuracy(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=64, help="training slides")
    parser.add_argument("--test", type=int, default=200, help="held-out slides")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "arrangement.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"arrangement task: {args.train} training / {args.test} held-out slides, 12x12 grid, 32-d "
          "features, "
          f"d_model {args.d_model}, {args.layers} layers, {args.epochs} epochs, threads {args.threads}")
    print(f"{'config':<20} {'seed':>4} {'train acc':>9} {'test acc':>9} {'time s':>7}")
    rows = []
    for name in args.configs:
        tests = []
        for seed in args.seeds:
            train = arrangement_slides(args.train, seed=1000 + seed)
            test = arrangement_slides(args.test, seed=2000 + seed)
            ctx = ContextConfig(d_model=args.d_model, n_layers=args.layers, **CONFIGS[name])
            t0 = time.perf_counter()
            tr, te = train_and_score(ctx, train, test, epochs=args.epochs, seed=seed)
            tests.append(te)
            seconds = time.perf_counter() - t0
            rows.append({"config": name, "seed": seed, "train_acc": tr, "test_acc": te, "seconds": seconds})
            print(f"{name:<20} {seed:>4} {tr:>9.3f} {te:>9.3f} {seconds:>7.1f}", flush=True)
        print(f"{name:<20} mean {'':>9} {sum(tests) / len(tests):>9.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    means = {n: sum(r["test_acc"] for r in rows if r["config"] == n) / len(args.seeds) for n in args.configs}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows, "mean_test_acc": means}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
