"""Output heads: slide classification, region classification, region segmentation masks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from xtpath.models.config import HeadConfig

__all__ = ["ClassificationHead", "RegionHead", "SegmentationHead"]


class ClassificationHead(nn.Module):
    """Slide logits from the slide embedding: ``LayerNorm -> Dropout -> Linear`` (as xT reads its CLS).

    Parameters
    ----------
    dim : int
        Embedding channels.
    num_classes : int
        Classes ``C``.
    dropout : float
        Dropout before the linear layer.
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        """``pooled`` ``(dim,)`` -> logits ``(C,)``."""
        return self.fc(self.drop(self.norm(pooled)))


class RegionHead(ClassificationHead):
    """Per-region logits (a heatmap) from each region's context output, averaged over its tokens.

    The same layers (and parameters) as :class:`ClassificationHead`, applied to every region.
    """

    def forward(self, tokens: Tensor) -> Tensor:  # type: ignore[override]
        """``tokens`` ``(N, dim)`` or ``(N, h, w, dim)`` -> logits ``(N, C)``."""
        if tokens.dim() == 4:
            tokens = tokens.mean(dim=(1, 2))
        return self.fc(self.drop(self.norm(tokens)))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class SegmentationHead(nn.Module):
    """Per-region mask logits: merge context into the region's token grid, then a light upsampling decoder.

    For token grids ``(N, h, w, d)`` each region's context tokens are merged with its (projected) input
    tokens, by ``"add"`` or ``"concat"`` (``HeadConfig.merge``), and decoded by a 3x3 conv, then
    ``log2(upsample)`` steps of (2x bilinear upsampling, 3x3 conv, GroupNorm, GELU), then a 1x1 conv to
    ``C`` classes: masks of ``(h * upsample) x (w * upsample)`` pixels per region. With pooled features
    ``(N, d)`` there is no token grid and the masks are region-level, ``1 x 1`` (``m = 1``): the finest
    they can be is one label per region.

    Parameters
    ----------
    dim : int
        Context channels ``d``.
    num_classes : int
        Classes ``C``.
    token_grid : (int, int) or None
        Tokens per region, or ``None`` for pooled features.
    cfg : HeadConfig
        ``merge``, ``upsample``, ``decoder_dim``, ``dropout``.
    """

    def __init__(self, dim: int, num_classes: int, token_grid: tuple[int, int] | None,
                 cfg: HeadConfig) -> None:
        super().__init__()
        self.merge = cfg.merge
        self.pooled = token_grid is None
        cin = 2 * dim if cfg.merge == "concat" else dim
        self.drop = nn.Dropout(cfg.dropout)
        if self.pooled:
            self.norm = nn.LayerNorm(cin)
            self.fc = nn.Linear(cin, num_classes)
            return
        width = cfg.decoder_dim
        self.stem = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), _norm(width), nn.GELU())
        ups = []
        for _ in range(int(math.log2(cfg.upsample))):
            nxt = max(16, width // 2)
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                     nn.Conv2d(width, nxt, 3, padding=1), _norm(nxt), nn.GELU()))
            width = nxt
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, tokens: Tensor, inputs: Tensor) -> Tensor:
        """Mask logits.

        Parameters
        ----------
        tokens : Tensor
            Context outputs ``(N, h, w, d)`` or ``(N, d)``.
        inputs : Tensor
            Projected input tokens, same shape.

        Returns
        -------
        Tensor
            ``(N, C, h * upsample, w * upsample)``, or ``(N, C, 1, 1)`` for pooled features.
        """
        merged = tokens + inputs if self.merge == "add" else torch.cat([inputs, tokens], dim=-1)
        if self.pooled:
            return self.fc(self.drop(self.norm(merged)))[:, :, None, None]
        x = self.up(self.stem(merged.permute(0, 3, 1, 2)))
        return self.out(self.drop(x))
