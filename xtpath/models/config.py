"""Configuration dataclasses of the xT model: context encoder, heads, whole model (JSON round-trip)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from xtpath.errors import InvalidParameterError

__all__ = ["ContextConfig", "HeadConfig", "XTConfig", "TASKS", "SCANS", "MERGES", "POOLS"]

TASKS = ("classification", "region", "segmentation")
SCANS = ("xt", "raster", "cross", "hilbert")
MERGES = ("add", "concat")
POOLS = ("mean", "cls")
_BACKENDS = ("auto", "torch", "cuda")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameterError(message)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{where} must be a JSON object of {cls.__name__} fields, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidParameterError(f"{where} has unknown fields {unknown}; valid fields are {sorted(names)}")
    return cls(**data)


@dataclass
class ContextConfig:
    """The context encoder that reads all regions of a slide at once.

    Parameters
    ----------
    name : str
        Registered encoder: ``"mamba"``, ``"transformer"``, ``"abmil"`` or ``"mean"``
        (see :data:`xtpath.models.CONTEXT_ENCODERS`).
    d_model : int
        Context width (channels); region features are projected to it. A multiple of 4.
    n_layers : int
        Layers (mamba, transformer).
    dropout : float
        Dropout on each layer's output (and on ABMIL's hidden features).
    d_state, d_conv, expand : int
        Mamba state size ``N``, causal 1-D conv width, and inner width factor
        (``d_inner = expand * d_model``).
    dt_rank : int or None
        Rank of the step-size projection; ``None`` is ``ceil(d_model / 16)``.
    scan : str
        Mamba scan orders per layer: ``"cross"`` (row- and column-major, both directions; the default,
        chosen by the arrangement test: held-out accuracy 1.00 vs 0.87 ``"hilbert"``, 0.55 ``"raster"``,
        0.60 ``"xt"``), ``"hilbert"``, ``"raster"`` (row-major both ways) or ``"xt"`` (xT's single raster
        order, flipped on even layers).
    conv2d : int or None
        Kernel side of the depthwise 2-D convolution over the token grid before each Mamba layer's scan
        (holes are zeros); ``0`` turns it off; ``None`` means 3, or 0 for ``scan="xt"``.
    backend : str
        Mamba scan: ``"auto"`` (mamba-ssm kernels on CUDA if installed, else ours), ``"torch"`` (always
        ours), ``"cuda"`` (always the kernels; errors if missing).
    scan_chunk : int or None
        Chunk length of our scan (``None``: automatic). Does not change results.
    n_heads : int
        Attention heads (transformer); divides ``d_model``.
    mlp_ratio : float
        Hidden width of the transformer's gated MLP, times ``d_model``.
    xl_chunk : int
        Transformer-XL chunk length in tokens; attention is within a chunk plus the previous one.
    xl_memory : bool
        Attend to the (detached) previous chunk as memory.
    attn_dim : int
        Hidden width of ABMIL's gated attention.
    pos_embed : bool
        Add the fixed 2-D sin-cos embedding of the real token positions (mamba, transformer).
    checkpoint : bool
        Recompute each layer's activations in the backward pass instead of keeping them (activation
        checkpointing; mamba, transformer): peak memory drops from all layers' activations to one layer's,
        at the cost of a second forward pass. Measured at 16k tokens, d_model 256, 4 layers: 7.7 GB -> 2.4 GB.
    pool : str
        Slide embedding of mamba and transformer: ``"mean"`` of the context outputs of all tokens (the
        default, chosen by the arrangement test: 1.00 vs 0.50 held-out accuracy with ``"cls"``) or
        ``"cls"``, the output of a CLS token appended at the end of the sequence (xT). ABMIL and mean pool
        in their own way.
    """

    name: str = "mamba"
    d_model: int = 256
    n_layers: int = 4
    dropout: float = 0.0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    scan: str = "cross"
    conv2d: int | None = None
    backend: str = "auto"
    scan_chunk: int | None = None
    n_heads: int = 8
    mlp_ratio: float = 4.0
    xl_chunk: int = 1024
    xl_memory: bool = True
    attn_dim: int = 128
    pos_embed: bool = True
    checkpoint: bool = False
    pool: str = "mean"

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name),
                 f"context.name must be a non-empty string, got {self.name!r}")
        _require(self.d_model >= 4 and self.d_model % 4 == 0,
                 f"context.d_model must be a positive multiple of 4, got {self.d_model}")
        _require(self.n_layers >= 1, f"context.n_layers must be >= 1, got {self.n_layers}")
        _require(0.0 <= self.dropout < 1.0, f"context.dropout must be in [0, 1), got {self.dropout}")
        _require(self.d_state >= 1, f"context.d_state must be >= 1, got {self.d_state}")
        _require(self.d_conv >= 1, f"context.d_conv must be >= 1, got {self.d_conv}")
        _require(self.expand >= 1, f"context.expand must be >= 1, got {self.expand}")
        _require(self.dt_rank is None or self.dt_rank >= 1,
                 f"context.dt_rank must be >= 1 or None, got {self.dt_rank}")
        _require(self.scan in SCANS,
                 f"context.scan={self.scan!r} is not a scan option; use one of {list(SCANS)}")
        _require(self.conv2d is None or (self.conv2d >= 0 and (self.conv2d == 0 or self.conv2d % 2 == 1)),
                 f"context.conv2d must be 0 (off), an odd kernel size or None, got {self.conv2d}")
        _require(self.backend in _BACKENDS,
                 f"context.backend={self.backend!r} is not valid; use one of {list(_BACKENDS)}")
        _require(self.scan_chunk is None or self.scan_chunk >= 1,
                 f"context.scan_chunk must be >= 1 or None, got {self.scan_chunk}")
        _require(self.n_heads >= 1 and self.d_model % self.n_heads == 0,
                 f"context.n_heads={self.n_heads} must divide context.d_model={self.d_model}")
        _require(self.mlp_ratio > 0, f"context.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _require(self.xl_chunk >= 1, f"context.xl_chunk must be >= 1 token, got {self.xl_chunk}")
        _require(self.pool in POOLS, f"context.pool={self.pool!r} is not valid; use one of {list(POOLS)}")
        _require(self.attn_dim >= 1, f"context.attn_dim must be >= 1, got {self.attn_dim}")

    @property
    def resolved_dt_rank(self) -> int:
        """``dt_rank``, with ``None`` resolved to ``ceil(d_model / 16)`` as in mamba-ssm."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def resolved_conv2d(self) -> int:
        """Grid-convolution kernel side, with ``None`` resolved (3, or 0 for ``scan="xt"``)."""
        if self.conv2d is not None:
            return self.conv2d
        return 0 if self.scan == "xt" else 3


@dataclass
class HeadConfig:
    """Output heads.

    Parameters
    ----------
    merge : str
        Segmentation: how each region's context output joins its token grid, ``"add"`` or ``"concat"``.
    upsample : int
        Segmentation: mask side ``m = h * upsample`` for ``h x h`` token grids (a power of 2, >= 1). With
        pooled features there is no token grid and masks are region-level, ``m = 1``.
    decoder_dim : int
        Segmentation decoder width (halved at each 2x upsampling, at least 16).
    region_um : float or None
        Side of one region in micrometres, if known; then ``XTModel.mask_mpp`` is
        ``region_um / m`` micrometres per mask pixel.
    dropout : float
        Dropout before the final linear layers.
    """

    merge: str = "add"
    upsample: int = 4
    decoder_dim: int = 128
    region_um: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(self.merge in MERGES, f"head.merge={self.merge!r} is not valid; use one of {list(MERGES)}")
        _require(self.upsample >= 1 and (self.upsample & (self.upsample - 1)) == 0,
                 f"head.upsample must be a power of 2 (1, 2, 4, ...), got {self.upsample}")
        _require(self.decoder_dim >= 1, f"head.decoder_dim must be >= 1, got {self.decoder_dim}")
        _require(self.region_um is None or self.region_um > 0,
                 f"head.region_um must be > 0 micrometres or None, got {self.region_um}")
        _require(0.0 <= self.dropout < 1.0, f"head.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class XTConfig:
    """The whole model: region features in, slide/region/mask logits out.

    Parameters
    ----------
    in_dim : int
        Channels ``D`` of the cached region features.
    num_classes : int
        Output classes ``C`` (use 1 for a single logit).
    task : str
        ``"classification"`` (slide logits), ``"region"`` (one label per region) or ``"segmentation"``
        (per-region masks).
    token_grid : (int, int) or None
        Tokens per region ``(h, w)`` when features are token grids ``(N, h, w, D)``; ``None`` for pooled
        vectors ``(N, D)``.
    context : ContextConfig
        Context encoder.
    head : HeadConfig
        Heads.
    """

    in_dim: int
    num_classes: int
    task: str = "classification"
    token_grid: tuple[int, int] | None = None
    context: ContextConfig = field(default_factory=ContextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.in_dim, int) and self.in_dim >= 1,
                 f"in_dim must be a positive int, got {self.in_dim!r}")
        _require(isinstance(self.num_classes, int) and self.num_classes >= 1,
                 f"num_classes must be a positive int, got {self.num_classes!r}")
        _require(self.task in TASKS, f"task={self.task!r} is not valid; use one of {list(TASKS)}")
        if self.token_grid is not None:
            tg = tuple(self.token_grid)
            _require(len(tg) == 2 and all(isinstance(v, int) and v >= 1 for v in tg),
                     f"token_grid must be None or (h, w) positive ints, got {self.token_grid!r}")
            self.token_grid = (int(tg[0]), int(tg[1]))
        if isinstance(self.context, dict):
            self.context = _from_dict(ContextConfig, self.context, "context")
        if isinstance(self.head, dict):
            self.head = _from_dict(HeadConfig, self.head, "head")
        _require(isinstance(self.context, ContextConfig),
                 f"context must be a ContextConfig, got {type(self.context).__name__}")
        _require(isinstance(self.head, HeadConfig),
                 f"head must be a HeadConfig, got {type(self.head).__name__}")

    @property
    def mask_side(self) -> int:
        """Side ``m`` of the per-region masks: ``h * upsample`` (token grids) or 1 (pooled features)."""
        if self.token_grid is None:
            return 1
        return self.token_grid[0] * self.head.upsample

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (``from_dict`` inverts it)."""
        out = dataclasses.asdict(self)
        out["token_grid"] = list(self.token_grid) if self.token_grid is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "XTConfig":
        """Build from :meth:`to_dict` output; unknown fields raise :class:`InvalidParameterError`."""
        cfg = _from_dict(cls, data, "model config")
        return cfg
