"""Stitch per-region masks into one slide mask over the region grid's bounding box."""

from __future__ import annotations

from torch import Tensor

from xtpath.errors import InvalidParameterError
from xtpath.models.positions import check_grid

__all__ = ["stitch_region_masks"]


def stitch_region_masks(masks: Tensor, grid: Tensor) -> Tensor:
    """Place each region's mask at its grid position; holes stay 0.

    Parameters
    ----------
    masks : Tensor
        ``(N, C, m, m)`` (or ``(N, C, mh, mw)``) per-region mask logits or probabilities.
    grid : Tensor
        ``(N, 2)`` integer ``(row, col)`` of each region; any order and offset.

    Returns
    -------
    Tensor
        ``(C, rows * m, cols * m)`` over the bounding box of ``grid`` (``rows = max row - min row + 1``);
        region ``i`` fills ``[(row_i - min_row) * m : ... + m, (col_i - min_col) * m : ... + m]``.

    Raises
    ------
    InvalidParameterError
        On wrong shapes or two regions at one position.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 4:
        raise InvalidParameterError(f"masks must be (N, C, m, m), got {tuple(getattr(masks, 'shape', ()))}")
    n, c, mh, mw = masks.shape
    g = check_grid(grid, n).to(masks.device)
    g = g - g.min(dim=0).values
    rows, cols = int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1
    canvas = masks.new_zeros(rows, cols, c, mh, mw)
    canvas = canvas.index_put((g[:, 0], g[:, 1]), masks)
    return canvas.permute(2, 0, 3, 1, 4).reshape(c, rows * mh, cols * mw)
