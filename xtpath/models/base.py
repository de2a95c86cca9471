"""What every context encoder takes and returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ContextOutput", "ContextEncoder", "make_cls_token"]


@dataclass
class ContextOutput:
    """Output of a context encoder for one slide.

    Attributes
    ----------
    tokens : Tensor
        ``(L, d_model)`` per-token outputs, in the order of the encoder's input.
    pooled : Tensor
        ``(d_model,)`` slide embedding (the CLS output, or the (attention-)pooled tokens).
    attention : Tensor or None
        ``(L,)`` attention weights over tokens (ABMIL), summing to 1.
    """

    tokens: Tensor
    pooled: Tensor
    attention: Tensor | None = None


class ContextEncoder(nn.Module):
    """Base class: ``forward(x, pos, region_shape) -> ContextOutput``.

    ``x`` ``(L, d_model)`` are the projected tokens of one slide in row-major order of ``pos`` ``(L, 2)``
    (token positions, starting at 0); ``region_shape`` is the ``(h, w)`` tokens per region (``(1, 1)``
    for pooled features). ``uses_positions`` says whether the output depends on ``pos``.
    """

    uses_positions: bool = True

    def forward(self, x: Tensor, pos: Tensor,
                region_shape: tuple[int, int]) -> ContextOutput:  # pragma: no cover
        raise NotImplementedError


def make_cls_token(d_model: int, pool: str) -> nn.Parameter | None:
    """A learned CLS token ``(d_model,)`` (normal, std 0.02) when ``pool == "cls"``, else ``None``."""
    if pool != "cls":
        return None
    token = nn.Parameter(torch.zeros(d_model))
    nn.init.normal_(token, std=0.02)
    return token
