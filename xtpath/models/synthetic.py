"""Synthetic slides (tensors only) for testing context models: the arrangement task.

Each slide is a ``rows x cols`` region grid (some cells are holes) of random region features: every region
is one of a few random "tissue type" prototype vectors, picked at random, plus Gaussian noise. Exactly two
regions are of a further, "marked" type. The label is 1 if the two marked regions share an edge and 0 if
they lie far apart (Chebyshev distance at least ``far``). Both classes have the same kinds of regions and
exactly two marked ones, so no single region and no pooled statistic tells them apart: only the
arrangement does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xtpath.errors import InvalidParameterError

__all__ = ["SyntheticSlide", "arrangement_slides"]


@dataclass
class SyntheticSlide:
    """One synthetic slide.

    Attributes
    ----------
    features : Tensor
        ``(N, dim)`` float32 region features, rows in random order.
    grid : Tensor
        ``(N, 2)`` long ``(row, col)`` of each row of ``features``.
    label : int
        1 if the two marked regions touch, 0 if they are far apart.
    marked : Tensor
        ``(2,)`` row indices of the marked regions.
    """

    features: Tensor
    grid: Tensor
    label: int
    marked: Tensor


def arrangement_slides(n_slides: int, rows: int = 12, cols: int = 12, dim: int = 32, prototypes: int = 8,
                       noise: float = 0.5, marker_scale: float = 3.0, holes: float = 0.1, far: int = 3,
                       seed: int = 0, world_seed: int = 0) -> list[SyntheticSlide]:
    """Balanced arrangement-task slides (labels alternate 1, 0, 1, ...).

    Parameters
    ----------
    n_slides : int
        Number of slides.
    rows, cols : int
        Region grid size.
    dim : int
        Feature channels.
    prototypes : int
        Number of background region types (standard normal vectors); the marked type is one more.
    noise : float
        Standard deviation of the per-region Gaussian noise added to its type's vector.
    marker_scale : float
        Length of the marked type's vector relative to the background types' (all standard normal).
    holes : float
        Fraction of cells left empty (never a marked cell), in ``[0, 0.5]``.
    far : int
        Negative slides have their marked regions at Chebyshev distance ``>= far``.
    seed : int
        Random seed of the slides.
    world_seed : int
        Random seed of the type vectors (keep it equal for training and held-out slides).

    Returns
    -------
    list of SyntheticSlide
    """
    if (n_slides < 1 or rows < 2 or cols < 2 or not 0.0 <= holes <= 0.5 or far < 2 or max(rows, cols) <= far
            or prototypes < 1 or noise < 0 or marker_scale <= 0):
        raise InvalidParameterError(
            "arrangement_slides needs n_slides >= 1, rows and cols >= 2 and > far >= 2, holes in [0, 0.5], "
            "prototypes >= 1, noise >= 0, marker_scale > 0; got "
            f"n_slides={n_slides}, rows={rows}, cols={cols}, far={far}, holes={holes}, "
            f"prototypes={prototypes}, noise={noise}, marker_scale={marker_scale}")
    types = torch.randn(prototypes + 1, dim, generator=torch.Generator().manual_seed(world_seed))
    types[prototypes] *= marker_scale
    g = torch.Generator().manual_seed(seed)
    cells = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    cells = cells.reshape(-1, 2)
    slides = []
    for i in range(n_slides):
        label = 1 - i % 2
        while True:
            a, b = torch.randint(0, rows * cols, (2,), generator=g).tolist()
            d = (cells[a] - cells[b]).abs()
            touching = int(d.sum()) == 1
            apart = int(d.max()) >= far
            if (label == 1 and touching) or (label == 0 and apart):
                break
        keep = torch.rand(rows * cols, generator=g) >= holes
        keep[a] = keep[b] = True
        idx = torch.nonzero(keep).squeeze(1)
        kind = torch.randint(0, prototypes, (idx.numel(),), generator=g)
        marked = torch.stack([torch.nonzero(idx == a)[0, 0], torch.nonzero(idx == b)[0, 0]])
        kind[marked] = prototypes
        feats = types[kind] + noise * torch.randn(idx.numel(), dim, generator=g)
        perm = torch.randperm(idx.numel(), generator=g)
        slides.append(SyntheticSlide(features=feats[perm], grid=cells[idx][perm], label=label,
                                     marked=torch.argsort(perm)[marked]))
    return slides
