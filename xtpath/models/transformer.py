"""xT's "XL" context: a pre-RMSNorm transformer run Transformer-XL style over fixed-length chunks.

Each block is ``x = x + Attn(RMSNorm(x), memory); x = x + GatedMLP(RMSNorm(x))`` with attention through
``F.scaled_dot_product_attention``. The token sequence (row-major, CLS appended at the end) is cut into
chunks of ``xl_chunk`` tokens processed one after another; at every layer a chunk attends to itself and,
as memory, to the previous chunk's input to that layer with the gradient stopped (``detach``), as in the xT
paper. Attention matrices are at most ``xl_chunk x 2 xl_chunk``, so 64k tokens fit in memory; depth gives a
receptive field of one more chunk per layer. The slide embedding is the mean of the token outputs
(``pool="mean"``) or the output of a CLS token appended at the end (``pool="cls"``, xT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xtpath.models.base import ContextEncoder, ContextOutput, make_cls_token
from xtpath.models.config import ContextConfig
from xtpath.models.positions import sincos_2d

__all__ = ["XLAttention", "GatedMLP", "XLBlock", "TransformerContext"]


class XLAttention(nn.Module):
    """Multi-head attention of a chunk over ``[memory, chunk]`` (not causal).

    Parameters
    ----------
    dim : int
        Channels.
    n_heads : int
        Heads; divides ``dim``.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        """``x`` ``(Lc, dim)`` normalised chunk, ``memory`` ``(Lm, dim)`` normalised -> ``(Lc, dim)``."""
        lc, dim = x.shape
        ctx = x if memory is None else torch.cat([memory, x])
        q, k, v = self.qkv(ctx).chunk(3, dim=-1)
        q = q[-lc:]

        def heads(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], self.n_heads, dim // self.n_heads).transpose(0, 1)

        out = F.scaled_dot_product_attention(heads(q)[None], heads(k)[None], heads(v)[None])[0]
        return self.proj(out.transpose(0, 1).reshape(lc, dim))


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``fc2(silu(a) * b)`` with ``a, b = fc1(x).chunk(2)``; ``hidden`` channels."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class XLBlock(nn.Module):
    """Pre-RMSNorm block: attention with memory, then gated MLP."""

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.RMSNorm(d)
        self.attn = XLAttention(d, cfg.n_heads)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = GatedMLP(d, max(1, int(round(cfg.mlp_ratio * d))))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor | None) -> Tensor:
        """``x`` ``(Lc, d)``, ``memory`` ``(Lm, d)`` (already detached) or ``None``."""
        mem = self.norm1(memory) if memory is not None else None
        x = x + self.drop(self.attn(self.norm1(x), mem))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerContext(ContextEncoder):
    """xT's Transformer-XL context encoder (registry name ``"transformer"``).

    Parameters
    ----------
    cfg : ContextConfig
        ``d_model``, ``n_layers``, ``n_heads``, ``mlp_ratio``, ``xl_chunk``, ``xl_memory``, ``pos_embed``.
    """

    uses_positions = True

    def __init__(self, cfg: ContextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_token = make_cls_token(cfg.d_model, cfg.pool)
        self.layers = nn.ModuleList(XLBlock(cfg) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor, pos: Tensor, region_shape: tuple[int, int]) -> ContextOutput:
        """Context for one slide: ``x`` ``(L, d)`` in the model's order, ``pos`` ``(L, 2)``."""
        if self.cfg.pos_embed:
            x = x + sincos_2d(pos, x.shape[1], dtype=x.dtype)
        cls = self.cls_token is not None
        seq = torch.cat([x, self.cls_token.to(x.dtype)[None]]) if cls else x
        memories: list[Tensor | None] = [None] * len(self.layers)
        outs = []
        for chunk in seq.split(self.cfg.xl_chunk):
            h = chunk
            for i, layer in enumerate(self.layers):
                if self.cfg.checkpoint and torch.is_grad_enabled():
                    new = checkpoint(layer, h, memories[i], use_reentrant=False)
                else:
                    new = layer(h, memories[i])
                if self.cfg.xl_memory:
                    memories[i] = h.detach()
                h = new
            outs.append(h)
        out = torch.cat(outs)
        if cls:
            return ContextOutput(tokens=out[:-1], pooled=out[-1])
        return ContextOutput(tokens=out, pooled=out.mean(0))
