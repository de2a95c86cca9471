"""Depthwise 2-D convolution over the tokens of a slide, which sit on a grid with holes.

Holes (no tissue) and the outside of the bounding box count as zeros. Two equal implementations: a dense
canvas over the bounding box (``F.conv2d``, when the tokens fill at least a quarter of it) and a sparse
neighbour gather (when the slide is mostly holes, e.g. two tissue pieces far apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GridLayout", "GridConv"]


class GridLayout:
    """Where each token sits, computed once per slide and shared by all layers.

    Parameters
    ----------
    pos : Tensor
        ``(L, 2)`` long token positions ``(row, col)``, starting at 0, unique.
    kernel : int
        Odd kernel side of the convolutions that will use this layout.
    dense : bool or None
        Force the dense canvas (``True``) or the sparse gather (``False``); ``None`` chooses by fill.
    """

    def __init__(self, pos: Tensor, kernel: int, dense: bool | None = None) -> None:
        self.n = pos.shape[0]
        self.kernel = kernel
        self.height = int(pos[:, 0].max()) + 1
        self.width = int(pos[:, 1].max()) + 1
        area = self.height * self.width
        self.dense = dense if dense is not None else area <= 4 * self.n + 1024
        self.flat = pos[:, 0] * self.width + pos[:, 1]
        if not self.dense:
            self.neighbours = self._neighbours(pos)

    def _neighbours(self, pos: Tensor) -> Tensor:
        """``(k*k, L)`` index of the token at each kernel offset, ``L`` where there is none."""
        k, half = self.kernel, self.kernel // 2
        order = torch.argsort(self.flat)
        keys = self.flat[order]
        out = []
        for di in range(k):
            for dj in range(k):
                r = pos[:, 0] + di - half
                c = pos[:, 1] + dj - half
                inside = (r >= 0) & (r < self.height) & (c >= 0) & (c < self.width)
                q = r * self.width + c
                at = torch.searchsorted(keys, q).clamp(max=self.n - 1)
                found = inside & (keys[at] == q)
                out.append(torch.where(found, order[at], torch.full_like(at, self.n)))
        return torch.stack(out)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Depthwise convolution of token features.

        Parameters
        ----------
        x : Tensor
            ``(L, C)`` token features.
        weight : Tensor
            ``(C, 1, k, k)`` depthwise kernel (``nn.Conv2d`` with ``groups=C``; cross-correlation).
        bias : Tensor or None
            ``(C,)``.

        Returns
        -------
        Tensor
            ``(L, C)``.
        """
        c = x.shape[1]
        if self.dense:
            canvas = x.new_zeros(c, self.height * self.width)
            canvas = canvas.index_copy(1, self.flat, x.t())
            out = F.conv2d(canvas.view(1, c, self.height, self.width), weight, bias,
                           padding=self.kernel // 2, groups=c)
            return out.view(c, -1).index_select(1, self.flat).t()
        xp = torch.cat([x, x.new_zeros(1, c)])
        w = weight.reshape(c, -1)
        out = xp.index_select(0, self.neighbours[0]) * w[:, 0]
        for o in range(1, self.neighbours.shape[0]):
            out = out.addcmul(xp.index_select(0, self.neighbours[o]), w[:, o])
        return out + bias if bias is not None else out


class GridConv(nn.Module):
    """Depthwise ``k x k`` convolution over the slide's token grid (an ``nn.Conv2d`` named ``conv``).

    Parameters
    ----------
    dim : int
        Channels.
    kernel : int
        Odd kernel side.
    """

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: Tensor, layout: GridLayout) -> Tensor:
        """``x``: ``(L, dim)`` tokens at ``layout``'s positions; returns ``(L, dim)``."""
        return layout.conv(x, self.conv.weight, self.conv.bias)
