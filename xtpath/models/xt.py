"""The xT model for one slide: project region features, run the context encoder over all regions, apply heads.

``features`` are the cached region features, ``(N, D)`` pooled vectors or ``(N, h, w, D)`` token grids
(channels last), and ``grid`` ``(N, 2)`` the ``(row, col)`` of each region on the slide's region grid, in
any order, with holes, from any offset. The model first puts the regions in its own canonical order
(regions row-major; tokens row-major inside each region, xT's nested order) from ``grid`` alone, so its
outputs do not depend on the order of the input rows; outputs are returned in the input order.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from xtpath.errors import InvalidParameterError
from xtpath.models.config import XTConfig
from xtpath.models.context import build_context_encoder
from xtpath.models.heads import ClassificationHead, RegionHead, SegmentationHead
from xtpath.models.orders import inverse_permutation, raster_order
from xtpath.models.positions import check_grid, token_positions

__all__ = ["XTModel", "ModelOutput", "ContextFeatures"]


@dataclass
class ContextFeatures:
    """What :meth:`XTModel.forward_features` returns, in the input order of the regions.

    Attributes
    ----------
    tokens : Tensor
        Context outputs, ``(N, d_model)`` or ``(N, h, w, d_model)``.
    inputs : Tensor
        Projected input tokens before the context, same shape (the segmentation head merges them).
    pooled : Tensor
        ``(d_model,)`` slide embedding.
    attention : Tensor or None
        ``(N,)`` ABMIL attention per region (summed over its tokens), else ``None``.
    """

    tokens: Tensor
    inputs: Tensor
    pooled: Tensor
    attention: Tensor | None = None


@dataclass
class ModelOutput:
    """Outputs for one slide; a field is ``None`` when the task does not produce it.

    Attributes
    ----------
    logits : Tensor or None
        ``(C,)`` slide logits (``task="classification"``).
    region_logits : Tensor or None
        ``(N, C)`` per-region logits in input order (``task="region"``).
    mask_logits : Tensor or None
        ``(N, C, m, m)`` per-region mask logits in input order (``task="segmentation"``); see
        :attr:`XTModel.mask_mpp` for their resolution.
    embedding : Tensor
        ``(d_model,)`` slide embedding.
    attention : Tensor or None
        ``(N,)`` ABMIL attention per region.
    """

    logits: Tensor | None = None
    region_logits: Tensor | None = None
    mask_logits: Tensor | None = None
    embedding: Tensor | None = None
    attention: Tensor | None = None


class XTModel(nn.Module):
    """xT: region features -> context over the whole slide -> slide / region / mask logits.

    Parameters
    ----------
    cfg : XTConfig
        Model configuration (saved as JSON by :func:`xtpath.models.save_model`).

    Examples
    --------
    >>> cfg = XTConfig(in_dim=32, num_classes=2, context=ContextConfig(d_model=32, n_layers=1))
    >>> out = XTModel(cfg)(torch.randn(5, 32), torch.tensor([[0, 0], [0, 1], [1, 0], [3, 2], [7, 7]]))
    >>> out.logits.shape
    torch.Size([2])
    """

    def __init__(self, cfg: XTConfig) -> None:
        super().__init__()
        if not isinstance(cfg, XTConfig):
            raise InvalidParameterError(f"XTModel needs an XTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.context.d_model
        self.proj = nn.Linear(cfg.in_dim, d)
        self.context = build_context_encoder(cfg.context)
        if cfg.task == "classification":
            self.head: nn.Module = ClassificationHead(d, cfg.num_classes, cfg.head.dropout)
        elif cfg.task == "region":
            self.head = RegionHead(d, cfg.num_classes, cfg.head.dropout)
        else:
            self.head = SegmentationHead(d, cfg.num_classes, cfg.token_grid, cfg.head)

    @property
    def mask_mpp(self) -> float | None:
        """Micrometres per pixel of ``mask_logits``: ``head.region_um / m``, or ``None`` if not configured."""
        if self.cfg.head.region_um is None:
            return None
        return self.cfg.head.region_um / self.cfg.mask_side

    def _check_features(self, features: Tensor) -> Tensor:
        cfg = self.cfg
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise InvalidParameterError("features must be a floating-point torch.Tensor, got "
                                        f"{getattr(features, 'dtype', type(features).__name__)}")
        if cfg.token_grid is None:
            if features.dim() != 2 or features.shape[1] != cfg.in_dim:
                hint = (" (token grids need XTConfig.token_grid=(h, w))" if features.dim() == 4 else "")
                raise InvalidParameterError(f"features must be (N, in_dim={cfg.in_dim}) pooled vectors, got "
                                            f"{tuple(features.shape)}{hint}")
        else:
            h, w = cfg.token_grid
            if features.dim() != 4 or tuple(features.shape[1:]) != (h, w, cfg.in_dim):
                raise InvalidParameterError(f"features must be (N, {h}, {w}, {cfg.in_dim}) token grids "
                                            f"(token_grid={cfg.token_grid}, channels last), got "
                                            f"{tuple(features.shape)}")
        return features.to(self.proj.weight.dtype)

    def forward_features(self, features: Tensor, grid: Tensor) -> ContextFeatures:
        """Project the features and run the context encoder over every region of one slide.

        Parameters
        ----------
        features : Tensor
            ``(N, D)`` or ``(N, h, w, D)`` region features of one slide.
        grid : Tensor
            ``(N, 2)`` integer ``(row, col)`` of each region; any order and offset, holes allowed.

        Returns
        -------
        ContextFeatures
            Context outputs in the input order.

        Raises
        ------
        InvalidParameterError
            On wrong shapes or dtypes, an empty slide, or two regions at the same position.
        """
        features = self._check_features(features)
        n = features.shape[0]
        grid = check_grid(grid, n).to(features.device)
        grid = grid - grid.min(dim=0).values
        order = raster_order(grid)
        inverse = inverse_permutation(order)
        region_shape = self.cfg.token_grid or (1, 1)
        x = self.proj(features.index_select(0, order))  # (N, [h, w,] d) canonical order
        pos = token_positions(grid.index_select(0, order), self.cfg.token_grid)
        out = self.context(x.reshape(-1, x.shape[-1]), pos, region_shape)
        tokens = out.tokens.reshape(x.shape).index_select(0, inverse)
        attention = None
        if out.attention is not None:
            attention = out.attention.reshape(n, -1).sum(1).index_select(0, inverse)
        return ContextFeatures(tokens=tokens, inputs=x.index_select(0, inverse), pooled=out.pooled,
                               attention=attention)

    def forward_head(self, feats: ContextFeatures) -> ModelOutput:
        """Apply the task's head to :meth:`forward_features` output."""
        out = ModelOutput(embedding=feats.pooled, attention=feats.attention)
        if self.cfg.task == "classification":
            out.logits = self.head(feats.pooled)
        elif self.cfg.task == "region":
            out.region_logits = self.head(feats.tokens)
        else:
            out.mask_logits = self.head(feats.tokens, feats.inputs)
        return out

    def forward(self, features: Tensor, grid: Tensor) -> ModelOutput:
        """Logits for one slide; see :meth:`forward_features` for the inputs."""
        return self.forward_head(self.forward_features(features, grid))
