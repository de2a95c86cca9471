"""End-to-end training through the region encoder, in memory that does not grow with the slide.

Plain backpropagation through every region of a gigapixel slide keeps every region's encoder activations alive
until the loss is known; with tens of thousands of regions that is what runs out of memory. The bounded step
computes the *same* gradient in three passes:

1. encode all regions chunk by chunk without a graph -> region features ``z`` (small: one vector or token grid
   per region);
2. run the context model and head on ``z`` with a graph, compute the loss and backpropagate: this gives the
   model's gradients and ``dL/dz``;
3. re-encode each chunk with a graph and backpropagate its slice of ``dL/dz`` into the encoder.

Peak memory is one chunk's activations plus ``z``. Pass 3 repeats pass 1's computation exactly because the
encoder runs with frozen normalisation statistics and no dropout (its ``eval()`` mode, with gradients on), which is
usual when fine-tuning on whole slides and what makes the chunked gradient equal full backpropagation.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from xtpath.data import DIHEDRAL, SlideItem, dihedral_grid, dihedral_regions, region_targets
from xtpath.extract import ExtractConfig, plan_slide
from xtpath.io.files import atomic_path

__all__ = ["EndToEnd", "ENCODER_FILE", "encode_regions", "stain_jitter"]

ENCODER_FILE = "encoder.safetensors"


def stain_jitter(pixels: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Random haematoxylin/eosin/DAB intensity scaling and shift (colour deconvolution, scikit-image),
    ``pixels``: ``(..., 3)`` uint8."""
    from skimage.color import hed2rgb, rgb2hed

    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3) * 0.1
    hed = rgb2hed(pixels.reshape(-1, 1, 3)) * alpha + beta
    out = np.clip(hed2rgb(hed) * 255.0, 0, 255).astype(np.uint8)
    return out.reshape(pixels.shape)


class _SlidePlans:
    """Per slide: the region plan (tissue + grid, computed once) and pixel reads with augmentation."""

    def __init__(self, rows: list, cfg: Any, encoder_px: int, workers: int) -> None:
        self.rows, self.cfg = rows, cfg
        self.ecfg = ExtractConfig(encoder=cfg.encoder or "", target_mpp=cfg.target_mpp, region_px=cfg.region_px,
                                  encoder_px=encoder_px, min_tissue=cfg.min_tissue,
                                  tissue_preset=cfg.tissue_preset)
        self.encoder_px = encoder_px
        self._plans: dict[int, tuple[Any, Any]] = {}
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def plan(self, i: int) -> tuple[Any, Any]:
        if i not in self._plans:
            self._plans[i] = plan_slide(self.rows[i], self.ecfg, self.encoder_px)
        return self._plans[i]

    def read(self, i: int, index: np.ndarray, k: int, jitter: np.random.Generator | None) -> torch.Tensor:
        """uint8 ``(n, S, S, 3)`` pixels of regions ``index`` of slide ``i``, turned by symmetry ``k``."""
        slide, regions = self.plan(i)
        loc = regions.locations()[index]

        def one(xy: np.ndarray) -> np.ndarray:
            return slide.read_region((float(xy[0]), float(xy[1])), (regions.read_px, regions.read_px),
                                     mpp=regions.read_mpp)

        pix = list(self.pool.map(one, loc)) if self.pool is not None else [one(xy) for xy in loc]
        arr = np.stack(pix)
        if jitter is not None:
            arr = stain_jitter(arr, jitter)
        return dihedral_regions(torch.from_numpy(arr), k)


def encode_regions(encoder: Any, read: Callable[[np.ndarray], torch.Tensor], n: int, chunk: int,
                   device: torch.device, grad: bool = False) -> torch.Tensor:
    """Features of ``n`` regions, ``chunk`` at a time; ``read(index)`` gives their uint8 pixels."""
    outs = []
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk))
            outs.append(encoder(read(idx).to(device)))
    return torch.cat(outs)


class _TrainView:
    def __init__(self, owner: "EndToEnd", targets: list[np.ndarray] | None) -> None:
        self.owner, self.targets, self.epoch = owner, targets, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.owner.prep.rows)

    def symmetry(self, i: int) -> int:
        if not self.owner.cfg.augment:
            return 0
        return int(np.random.default_rng([self.owner.cfg.seed, self.epoch, i]).integers(DIHEDRAL))

    def jitter(self, i: int) -> np.random.Generator | None:
        if not self.owner.cfg.stain_augment:
            return None
        return np.random.default_rng([self.owner.cfg.seed, self.epoch, i, 7])


class _EvalView:
    """Slides as :class:`SlideItem` with features from the current encoder (no grad, no augmentation)."""

    def __init__(self, owner: "EndToEnd") -> None:
        self.owner = owner
        self.targets: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.owner.prep.rows)

    def __getitem__(self, i: int) -> SlideItem:
        o = self.owner
        _, regions = o.plans.plan(i)
        feats = encode_regions(o.encoder, lambda idx: o.plans.read(i, idx, 0, None), len(regions),
                               o.cfg.e2e_chunk, o.device)
        tgt = torch.from_numpy(self.targets[i]) if self.targets is not None else None
        label = o.prep.labels[i] if o.prep.labels is not None else None
        return SlideItem(o.prep.rows[i].slide_id, feats.float(), torch.from_numpy(regions.grid), label, tgt, i)


class EndToEnd:
    """The region encoder and the slide plans of an end-to-end run (used by :mod:`xtpath.train`)."""

    def __init__(self, prep: Any, cfg: Any, device: torch.device) -> None:
        from xtpath.models.encoders import RegionEncoder

        if cfg.encoder is None:
            from xtpath.errors import InvalidParameterError

            raise InvalidParameterError("--mode end2end needs --encoder (and usually --weights)")
        self.prep, self.cfg, self.device = prep, cfg, device
        self.encoder = RegionEncoder(cfg.encoder, cfg.weights, features=cfg.features, input_px=cfg.encoder_px,
                                     seed=cfg.seed).to(device)
        k = max(1, int(round(cfg.region_px / self.encoder.input_px)))
        self.feature_shape = self.encoder.feature_shape(k)
        self.plans = _SlidePlans(prep.rows, cfg, self.encoder.input_px, cfg.num_workers)
        self._eval = _EvalView(self)

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def train_mode(self) -> None:
        self.encoder.eval()  # frozen norm statistics, no dropout: the chunked gradient is exact

    def train_dataset(self, targets: list[np.ndarray] | None) -> _TrainView:
        self._eval.targets = targets
        return _TrainView(self, targets)

    def eval_dataset(self) -> _EvalView:
        return self._eval

    def segmentation_targets(self, model: Any) -> list[np.ndarray]:
        with torch.no_grad():
            probe = torch.zeros((1, *self.feature_shape), device=self.device)
            m = int(model(probe, torch.zeros((1, 2), dtype=torch.long, device=self.device)).mask_logits.shape[-1])
        out = []
        for i, row in enumerate(self.prep.rows):
            slide, regions = self.plans.plan(i)
            sf = SimpleNamespace(grid=regions.grid, region_size_level0=regions.region_size[0], path=row.path)
            out.append(region_targets(row, sf, self.prep.classes, m, slide_dimensions=slide.dimensions))
        return out

    def step(self, model: Any, view: _TrainView, i: int, loss_fn: Callable[[Any, SlideItem], torch.Tensor], *,
             scale: float = 1.0) -> float:
        """One slide's forward and backward; gradients accumulate in the model and the encoder."""
        _, regions = self.plans.plan(i)
        n, chunk = len(regions), self.cfg.e2e_chunk
        k = view.symmetry(i)
        jitter_seed = view.jitter(i)
        state = jitter_seed.bit_generator.state if jitter_seed is not None else None

        def read(idx: np.ndarray) -> torch.Tensor:
            gen = None
            if state is not None:  # the same jitter in both passes, whatever the chunk
                gen = np.random.default_rng()
                gen.bit_generator.state = state
            return self.plans.read(i, idx, k, gen)

        grid = dihedral_grid(torch.from_numpy(regions.grid), k).to(self.device)
        tgt = view.targets[i] if view.targets is not None else None
        tgt_t = dihedral_regions(torch.from_numpy(tgt), k, channels_last=False) if tgt is not None else None
        label = self.prep.labels[i] if self.prep.labels is not None else None
        if self.cfg.e2e_backprop == "full":
            feats = encode_regions(self.encoder, read, n, chunk, self.device, grad=True)
            item = SlideItem(self.prep.rows[i].slide_id, feats, grid, label, tgt_t, i)
            loss = loss_fn(model(feats, grid), item)
            (loss * scale).backward()
            return float(loss.detach())
        feats = encode_regions(self.encoder, read, n, chunk, self.device, grad=False).detach().requires_grad_(True)
        item = SlideItem(self.prep.rows[i].slide_id, feats, grid, label, tgt_t, i)
        loss = loss_fn(model(feats, grid), item)
        (loss * scale).backward()
        g = feats.grad
        assert g is not None
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk))
            out = self.encoder(read(idx).to(self.device))
            out.backward(g[s:s + len(idx)].to(out.dtype))
        return float(loss.detach())

    def all_reduce_grads(self, world: int) -> None:
        for p in self.encoder_parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

    def save_encoder(self, out_dir: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous() for k, v in self.encoder.model.state_dict().items()}
        with atomic_path(Path(out_dir) / ENCODER_FILE) as tmp:
            save_file(sd, str(tmp))

    def load_encoder(self, out_dir: str | os.PathLike[str]) -> None:
        from safetensors.torch import load_file

        self.encoder.model.load_state_dict(load_file(str(Path(out_dir) / ENCODER_FILE)))
