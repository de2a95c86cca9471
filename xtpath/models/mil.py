"""Context-free baselines: gated-attention MIL (ABMIL) and mean pooling.

Neither looks at positions: each token's output depends on that token only, and the slide embedding is
a (weighted) average, so moving a region elsewhere on the slide changes nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xtpath.models.base import ContextEncoder, ContextOutput
from xtpath.models.config import ContextConfig

__all__ = ["ABMILContext", "MeanContext"]


class ABMILContext(ContextEncoder):
    """Gated attention MIL (Ilse et al., 2018), registry name ``"abmil"``.

    ``h = ReLU(fc(x))``; ``a = softmax_L(w^T (tanh(V h) * sigmoid(U h)))``; slide ``= sum_l a_l h_l``.

    Parameters
    ----------
    cfg : ContextConfig
        ``d_model``, ``attn_dim``, ``dropout``.
    """

    uses_positions = False

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.fc = nn.Linear(d, d)
        self.attn_v = nn.Linear(d, cfg.attn_dim)
        self.attn_u = nn.Linear(d, cfg.attn_dim)
        self.attn_w = nn.Linear(cfg.attn_dim, 1)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, pos: Tensor, region_shape: tuple[int, int]) -> ContextOutput:
        """``x`` ``(L, d)`` -> tokens ``h`` ``(L, d)``, attention ``(L,)``, pooled ``(d,)``."""
        h = self.drop(torch.relu(self.fc(x)))
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        return ContextOutput(tokens=h, pooled=attention @ h, attention=attention)


class MeanContext(ContextEncoder):
    """Mean pooling, registry name ``"mean"``: tokens pass through, the slide embedding is their mean."""

    uses_positions = False

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()

    def forward(self, x: Tensor, pos: Tensor, region_shape: tuple[int, int]) -> ContextOutput:
        """``x`` ``(L, d)`` -> tokens ``x``, pooled ``x.mean(0)`` ``(d,)``."""
        return ContextOutput(tokens=x, pooled=x.mean(0))
