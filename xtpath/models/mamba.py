"""The Mamba context encoder: mamba-ssm's mixer, xT's block, and 2-D scan orders over the slide.

The mixer :class:`Mamba` has mamba-ssm's parameters, initialisation and state-dict names (``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``; ``A = -exp(A_log)``, softplus on
``dt + dt_proj.bias``). Its scan runs in mamba-ssm's fused CUDA kernel when that is installed and the
tensors are on CUDA, and in our scan (:mod:`xtpath.models.scan`) otherwise: on CPU the numba kernels of
:mod:`xtpath.models.cpu_scan` (conv + silu, and scan with softplus, skip and gate), elsewhere the eager
chunked scan; same weights, same outputs.

A layer of :class:`MambaContext` is xT's block ``h = LayerNorm(x); out = h + Mamba(h)``, widened to 2-D:
a depthwise convolution over the token grid (holes are zeros) and several scan orders of the same tokens
(row-major and column-major, both directions, by default), run as one batch through the shared mixer and
averaged back in place. The mixer's input and output projections act on each token alone, so they run once
per token, not once per order (the orders are averaged before ``out_proj``). Without gradients on CPU
(scoring, validation, napari), the fused kernels go further: they read every order's rows straight from
the projected tokens and add each order's outputs back at its tokens' rows, so no reordered copies are
made (measured at 50k regions, default encoder, 2 cores: 12.1 s -> 10.6 s, peak memory 2.4 -> 1.5 GB;
the same numbers as the reordering path, which training uses). ``scan="xt"`` keeps xT's
plain version: one nested raster order, flipped on even layers, no grid convolution.

Arrangement task (``benchmarks/arrangement.py``: 64 training slides, do two marked regions touch?), held-out
accuracy, mean of 3 seeds: ``scan="cross"`` 1.00 (0.98 without the grid convolution), ``"hilbert"`` 0.87,
``"raster"`` 0.55, ``"xt"`` 0.60 (0.61 with the grid convolution); transformer, ABMIL and mean 0.49-0.50.
Hence the default ``"cross"``.

The slide embedding is the mean of the token outputs (``pool="mean"``, default) or, as in xT, the output of
a CLS token appended at the end of every sequence (``pool="cls"``). Measured on the arrangement task (64
training slides): with the CLS readout the model memorises the training slides and stays at chance on
held-out ones, even for "is a marked region present at all"; at initialisation the state decays over a
few dozen steps (``dt`` in [0.001, 0.1], ``A = -(1..N)``), so the CLS sees only the end of each scan.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xtpath.models import cpu_scan
from xtpath.models.base import ContextEncoder, ContextOutput, make_cls_token
from xtpath.models.config import ContextConfig
from xtpath.models.gridconv import GridConv, GridLayout
from xtpath.models.kernels import cuda_selective_scan, use_cuda_kernel
from xtpath.models.orders import inverse_permutation, permute_rows, scan_orders
from xtpath.models.positions import sincos_2d
from xtpath.models.scan import default_chunk_size, scan_time_major

__all__ = ["Mamba", "MambaBlock", "MambaContext"]


class Mamba(nn.Module):
    """Mamba (S6) mixer, parameter-compatible with ``mamba_ssm.Mamba``.

    Parameters
    ----------
    d_model : int
        Input/output channels.
    d_state, d_conv, expand : int
        State size ``N``, causal conv width, inner width factor (``d_inner = expand * d_model``).
    dt_rank : int or None
        Step-size projection rank; ``None``: ``ceil(d_model / 16)``.
    dt_min, dt_max, dt_init_floor : float
        Initial step sizes are log-uniform in ``[dt_min, dt_max]`` (at least ``dt_init_floor``).
    backend : str
        ``"auto"``, ``"torch"`` or ``"cuda"`` (see :class:`ContextConfig`).
    scan_chunk : int or None
        Chunk length of our scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 backend: str = "auto", scan_chunk: int | None = None) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.backend, self.scan_chunk = backend, scan_chunk
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # mamba-ssm initialisation: dt_proj keeps variance; softplus(dt bias) log-uniform in [dt_min, dt_max]
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real initialisation: A[d, n] = -(n + 1)
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden``: ``(B, L, d_model)`` -> ``(B, L, d_model)``, causal along ``L``."""
        return self.out_proj(self.mix(self.in_proj(hidden)))

    def mix(self, xz: Tensor) -> Tensor:
        """Everything between the two projections: ``xz = in_proj(hidden)`` ``(B, L, 2 d_inner)`` ->
        ``(B, L, d_inner)``, the input of ``out_proj``: conv + silu, the selective scan, skip and gate.

        The projections act on each token alone, so a caller running several orders of the same tokens
        can project once and reorder ``xz`` (and average before ``out_proj``); see :class:`MambaBlock`.
        """
        length = xz.shape[1]
        x, z = xz.chunk(2, dim=-1)  # (B, L, d_inner) each
        A = -torch.exp(self.A_log.float())
        if use_cuda_kernel(self.backend, xz.is_cuda):
            x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length])  # (B, d_inner, L)
            dt, B, C = self._project(x.transpose(1, 2))
            y = cuda_selective_scan()(
                x.contiguous(), dt.transpose(1, 2).contiguous(), A, B.transpose(1, 2).contiguous(),
                C.transpose(1, 2).contiguous(), self.D.float(), z=z.transpose(1, 2).contiguous(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            y = y.transpose(1, 2)
        else:
            # time-major throughout: the (B, d_inner, L) <-> (B, L, d_inner) copies cost as much as the conv
            x = self._conv_silu(x)
            dt, B, C = self._project(x)
            # (scan + D x) * silu(z) with dt = softplus(dt + bias), float32 (float64 for float64 x); one
            # fused pass on CPU
            y, _ = scan_time_major(x, dt, A, B, C, self.scan_chunk, D=self.D, z=z,
                                   delta_bias=self.dt_proj.bias, delta_softplus=True)
        return y

    def can_mix_orders(self, xz: Tensor) -> bool:
        """Whether :meth:`mix_orders` applies: no gradients needed, CPU float32/64 (the weights' dtype, so not
        under autocast) and the fused kernels available."""
        return (not (torch.is_grad_enabled() and (xz.requires_grad or self.A_log.requires_grad))
                and xz.shape[0] > 0 and xz.device.type == "cpu" and cpu_scan.available() and self.backend != "cuda"
                and xz.dtype == self.conv1d.weight.dtype and xz.dtype in (torch.float32, torch.float64))

    def mix_orders(self, xz: Tensor, index: Tensor) -> Tensor:
        """:meth:`mix` of ``K`` orders of the same tokens, averaged back in token order, without gradients on
        CPU (see :meth:`can_mix_orders`): ``xz`` ``(R, 2 d_inner)`` in token order, ``index`` ``(K, L)`` the
        token of every step of every order; returns ``(R, d_inner)``. The same result as reordering ``xz``
        with ``index``, :meth:`mix`, putting the outputs back and averaging, without making the reordered
        copies (the kernels read and write through ``index``)."""
        d = self.d_inner
        x, z = xz[:, :d], xz[:, d:]
        w = self.conv1d.weight[:, 0, :]
        cb = self.conv1d.bias if self.conv1d.bias is not None else w.new_zeros(d)
        u = cpu_scan.conv_silu_orders(x, w, cb, index)  # (K, L, d_inner)
        dt, B, C = self._project(u)
        A = -torch.exp(self.A_log.float()).to(u.dtype)  # as mix() does
        chunk = self.scan_chunk or default_chunk_size(index.shape[1])
        return cpu_scan.scan_orders_mean(u, dt, A, B, C, chunk, index, D=self.D.to(u.dtype), z=z,
                                         delta_bias=self.dt_proj.bias.to(u.dtype), delta_softplus=True,
                                         n_rows=xz.shape[0])

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``(B, L, d_inner)`` -> ``dt`` (before bias) ``(B, L, d_inner)``, ``B``, ``C`` ``(B, L, N)``."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def _conv_silu(self, x: Tensor) -> Tensor:
        """``silu(conv1d(x))`` (depthwise, causal) on time-major ``x`` ``(B, L, d_inner)``, same layout.

        On CPU in float32/64, the fused kernel of :mod:`xtpath.models.cpu_scan` (one pass each way);
        elsewhere ``nn.Conv1d`` between two transposes (profiled at 4096 tokens x 4 orders x 512 channels
        on CPU: the transposing copies and the depthwise kernel took about 0.3 s per layer, both passes).
        """
        w = self.conv1d.weight[:, 0, :]
        if x.device.type == "cpu" and cpu_scan.available() and x.dtype == w.dtype and \
                x.dtype in (torch.float32, torch.float64):
            bias = self.conv1d.bias if self.conv1d.bias is not None else w.new_zeros(w.shape[0])
            return cpu_scan.conv_silu(x, w, bias)
        length = x.shape[1]
        return F.silu(self.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)


class MambaBlock(nn.Module):
    """One layer: ``h = LayerNorm(x)``; optional grid conv; Mamba over every scan order; ``h + mean``.

    Parameters
    ----------
    cfg : ContextConfig
        Encoder settings.
    """

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm = nn.LayerNorm(d)
        k = cfg.resolved_conv2d
        self.conv2d = GridConv(d, k) if k else None
        self.mixer = Mamba(d, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank, backend=cfg.backend,
                           scan_chunk=cfg.scan_chunk)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, layout: GridLayout | None, index: Tensor, inverse: Tensor, flip: bool,
                cls: bool = False) -> Tensor:
        """One layer on ``x`` ``(L, d)`` grid tokens (then a CLS token if ``cls``: ``(L + 1, d)``).

        ``index`` ``(K, L [+ 1])`` gathers each scan order's sequence (CLS last); ``inverse`` puts the
        outputs back; ``flip`` reverses every sequence (xT's alternation).
        """
        h = self.norm(x)
        u = h
        if self.conv2d is not None and layout is not None:
            grid = h[:-1] if cls else h
            u = grid + self.conv2d(grid, layout)
            if cls:
                u = torch.cat([u, h[-1:]])
        # The mixer's projections act on each token alone: project the tokens once, reorder the projections
        # per scan order, and average the orders before out_proj (linear), instead of running both
        # projections K times (3.3x fewer multiply-adds with 4 orders; the same result up to rounding).
        if flip:  # reversed sequences: flip the permutations instead of the tensors
            index, inverse = index.flip(1), index.shape[1] - 1 - inverse
        xz = self.mixer.in_proj(u)
        if self.mixer.can_mix_orders(xz):  # inference on CPU: the kernels read and write through the index
            y = self.mixer.mix_orders(xz, index)
        else:
            seqs = permute_rows(xz, index, inverse)  # (K, L + 1, 2 d_inner)
            y = permute_rows(self.mixer.mix(seqs), inverse, index).mean(0)  # back in place, mean over orders
        return h + self.drop(self.mixer.out_proj(y))


class MambaContext(ContextEncoder):
    """xT's Mamba context encoder with 2-D scan orders (registry name ``"mamba"``).

    Parameters
    ----------
    cfg : ContextConfig
        Encoder settings (``d_model``, ``n_layers``, ``scan``, ``conv2d``, Mamba sizes, ``backend``).
    """

    uses_positions = True

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_token = make_cls_token(cfg.d_model, cfg.pool)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor, pos: Tensor, region_shape: tuple[int, int]) -> ContextOutput:
        """Context for one slide.

        Parameters
        ----------
        x : Tensor
            ``(L, d_model)`` tokens, row-major by ``pos``.
        pos : Tensor
            ``(L, 2)`` long token positions, from 0.
        region_shape : (int, int)
            Tokens per region ``(h, w)``.

        Returns
        -------
        ContextOutput
            ``tokens`` ``(L, d_model)`` and the slide embedding ``pooled`` ``(d_model,)``.
        """
        length = x.shape[0]
        if self.cfg.pos_embed:
            x = x + sincos_2d(pos, x.shape[1], dtype=x.dtype)
        index = torch.stack(scan_orders(pos, self.cfg.scan, region_shape))  # (K, L)
        k = self.cfg.resolved_conv2d
        layout = GridLayout(pos, k) if k else None
        cls = self.cls_token is not None
        if cls:
            cls_at = torch.full((index.shape[0], 1), length, dtype=torch.long, device=x.device)
            index = torch.cat([index, cls_at], dim=1)  # (K, L + 1)
            x = torch.cat([x, self.cls_token.to(x.dtype)[None]])
        inverse = torch.stack([inverse_permutation(p) for p in index])
        h = x
        for i, layer in enumerate(self.layers):
            flip = self.cfg.scan == "xt" and i % 2 == 0
            if self.cfg.checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, h, layout, index, inverse, flip, cls, use_reentrant=False)
            else:
                h = layer(h, layout, index, inverse, flip, cls)
        if cls:
            return ContextOutput(tokens=h[:-1], pooled=h[-1])
        return ContextOutput(tokens=h, pooled=h.mean(0))
