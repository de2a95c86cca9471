"""Token positions on the slide and their fixed 2-D sin-cos embedding.

A slide is a sparse set of regions on a region grid (tissue only, so holes and non-square outlines are
normal). A region's ``(row, col)`` is its place on that grid. When a region is given as a token grid of
``h x w`` tokens, token ``(i, j)`` of region ``(row, col)`` sits at slide token position
``(row * h + i, col * w + j)``, so tokens of neighbouring regions are neighbours too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xtpath.errors import InvalidParameterError

__all__ = ["check_grid", "token_positions", "sincos_2d"]


def check_grid(grid: Tensor, n_regions: int) -> Tensor:
    """Validate region grid positions and return them as a long tensor.

    Parameters
    ----------
    grid : Tensor
        ``(N, 2)`` integer ``(row, col)`` of each region on the region grid; any order, any offset.
    n_regions : int
        Expected ``N`` (rows of the features).

    Returns
    -------
    Tensor
        ``(N, 2)`` long.

    Raises
    ------
    InvalidParameterError
        If the shape or dtype is wrong, ``N`` differs, or two regions share a position.
    """
    if not isinstance(grid, Tensor):
        raise InvalidParameterError(f"grid must be a torch.Tensor of shape (N, 2), got {type(grid).__name__}")
    if grid.dim() != 2 or grid.shape[1] != 2:
        raise InvalidParameterError(f"grid must have shape (N, 2) = (row, col) per region, got "
                                    f"{tuple(grid.shape)}")
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise InvalidParameterError(f"grid must hold integer (row, col) positions, got dtype {grid.dtype}; "
                                    "pass grid.long()")
    if grid.shape[0] != n_regions:
        raise InvalidParameterError(f"grid has {grid.shape[0]} rows but features have {n_regions} regions; "
                                    "pass one (row, col) per feature row")
    if n_regions == 0:
        raise InvalidParameterError("features and grid are empty; a slide needs at least one region")
    grid = grid.long()
    if torch.unique(grid, dim=0).shape[0] != n_regions:
        raise InvalidParameterError("grid has two regions at the same (row, col); each region needs its own "
                                    "position (drop or merge the duplicates)")
    return grid


def token_positions(grid: Tensor, token_grid: tuple[int, int] | None) -> Tensor:
    """Slide token positions of every token, region-major then row-major inside a region.

    Parameters
    ----------
    grid : Tensor
        ``(N, 2)`` long region positions ``(row, col)``.
    token_grid : (int, int) or None
        Tokens per region ``(h, w)``; ``None`` for one pooled vector per region.

    Returns
    -------
    Tensor
        ``(N * h * w, 2)`` long positions ``(row * h + i, col * w + j)``, in the order of
        ``features.reshape(N * h * w, D)``.
    """
    if token_grid is None:
        return grid
    h, w = token_grid
    ii = torch.arange(h, device=grid.device).repeat_interleave(w)
    jj = torch.arange(w, device=grid.device).repeat(h)
    rows = grid[:, :1] * h + ii[None, :]
    cols = grid[:, 1:] * w + jj[None, :]
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2)


def sincos_2d(pos: Tensor, dim: int, temperature: float = 10000.0,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sine-cosine embedding of integer positions (as in MAE / xT), from the real positions.

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(p * f_k), cos(p * f_k)]`` with frequencies ``f_k = temperature ** (-k / (dim / 4))``.

    Parameters
    ----------
    pos : Tensor
        ``(L, 2)`` positions ``(row, col)`` in tokens.
    dim : int
        Embedding width; a multiple of 4.
    temperature : float
        Longest wavelength, in tokens (times ``2 pi``).
    dtype : torch.dtype
        Output dtype.

    Returns
    -------
    Tensor
        ``(L, dim)``.
    """
    if dim % 4:
        raise InvalidParameterError(f"the sin-cos position embedding needs d_model divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = temperature ** (-torch.arange(quarter, device=pos.device, dtype=torch.float64) / quarter)
    p = pos.to(torch.float64)
    out = []
    for axis in (0, 1):
        angles = p[:, axis, None] * freqs[None, :]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1).to(dtype)
