"""Selective scan (Mamba's S6 recurrence): fused CPU kernels, an eager chunked scan, a sequential reference.

Both functions take mamba-ssm's ``selective_scan_fn`` arguments and compute, for every batch ``b``, channel
``d`` and state ``n``::

    dt[b, d, l] = softplus(delta[b, d, l] + delta_bias[d])      (softplus and bias only if requested)
    h[b, d, n, l] = exp(dt[b, d, l] * A[d, n]) * h[b, d, n, l-1] + dt[b, d, l] * B[b, n, l] * u[b, d, l]
    y[b, d, l] = sum_n C[b, n, l] * h[b, d, n, l] + D[d] * u[b, d, l]
    out = y * silu(z)                                             (gate only if ``z`` is given)

with ``h[..., -1] = 0``. The state ``h`` has ``B * D * N * L`` entries, the one tensor that makes this
recurrence expensive; :func:`selective_scan` never stores it whole.

Two fast implementations, chosen by ``impl`` (default ``"auto"``):

* ``"fused"`` (CPU tensors, the default there): numba-compiled forward and backward kernels in
  :mod:`xtpath.models.cpu_scan` that run the recurrence step by step with a block of channels' states in
  the L1 cache, the step-size bias and softplus, the skip ``D`` and the gate ``silu(z)`` fused in, and read
  channel-major and time-major tensors alike without transposing copies.
* ``"chunked"`` (any device; used on GPUs without mamba-ssm): eager PyTorch, described below.

How the chunked scan works (:class:`_ChunkedScan`, on time-major ``(B, L, D)`` tensors, which is how the Mamba
mixer's projections come out; :func:`selective_scan` transposes mamba-ssm's ``(B, D, L)`` layout): the
sequence is cut into ``K`` chunks of ``T`` steps (``T = ceil(sqrt(L))`` within 16..128). Every step of a chunk
is done for all chunks at once, so a Python loop of ``T`` steps works on ``(B, K, D, N)`` blocks instead of
``L`` steps on ``(B, D, N)`` slices, with in-place ``out=`` operations and no per-step autograd nodes:

1. a local scan of every chunk from a zero state gives each chunk's end state;
2. a loop over the ``K`` chunks carries the true state across chunk borders, using the chunk's whole decay
   ``exp(A * sum(dt))``, which is at most 1 (stable in float32);
3. the local scan is run again from the true chunk start states, now producing ``y``.

Only the ``K`` chunk start states are saved for backward. The backward pass is a hand-written reverse-time
scan of the same two-level shape: a local reverse scan of every chunk gives the gradient each chunk passes
to the one before, a loop over chunks carries it, and then, a group of chunks at a time, the states of the
group are recomputed from the saved chunk start states and the exact gradients are accumulated. Memory is
``O(B*D*L + B*D*N*K)`` plus one group's states (at most about 16 M numbers). Each sweep works on blocks of
at most about 4 M state numbers (a few chunks at a time on long sequences) so that a step's operands stay in
the CPU cache: one block over all chunks of 64k tokens made the forward pass 1.6x slower.

Speed (``benchmarks/context_scaling.py``, L=4096, d_inner 512, N 16, batch 1, float32, with bias, softplus,
skip and gate, forward+backward, best of 7, 2 CPU cores): fused 0.11 s against 2.3 s for the sequential
reference (21x in the last runs, 18-21x over the session on this noisy box; max relative error 1.6e-6 on
outputs, 5.1e-6 on gradients); the chunked scan 0.33 s (7x), ~30 passes over ``B*D*L*N`` numbers at memory
bandwidth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xtpath.errors import InvalidParameterError
from xtpath.models import cpu_scan

__all__ = ["selective_scan", "selective_scan_ref", "scan_time_major", "default_chunk_size", "SCAN_IMPLS"]

#: Implementations of the fast scan (``impl`` of :func:`selective_scan`).
SCAN_IMPLS = ("auto", "fused", "chunked")

# Upper bound (in numbers) on the states of one group of chunks recomputed at a time in backward.
_GROUP_NUMEL = 1 << 24
# Size (in numbers) of the state block one step of a sweep works on (see _chunk_groups).
_BLOCK_NUMEL = 1 << 22


def default_chunk_size(length: int) -> int:
    """Chunk length ``T`` the fast scan uses for a sequence of ``length`` steps: ``ceil(sqrt(L))`` in 16..128.

    Measured on 2 CPU cores (d_inner 512, N 16, L 4096): T from 64 to 256 all within 5 % of each other;
    larger T makes the backward pass recompute smaller groups of chunks (more Python steps) at long L.

    Parameters
    ----------
    length : int
        Sequence length ``L`` (steps).

    Returns
    -------
    int
        Steps per chunk.
    """
    return int(min(128, max(16, math.ceil(math.sqrt(max(length, 1))))))


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise InvalidParameterError(f"selective_scan: u must be (batch, dim, length), got shape "
                                    f"{tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise InvalidParameterError(
            f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise InvalidParameterError(f"selective_scan: A must be (dim={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        if m.shape != (b, n, length):
            raise InvalidParameterError(
                f"selective_scan: {name} must be input-dependent with shape (batch, d_state, length) = "
                f"{(b, n, length)}, got {tuple(m.shape)}")
    if D is not None and D.shape != (d,):
        raise InvalidParameterError(f"selective_scan: D must be (dim={d},), got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise InvalidParameterError(f"selective_scan: delta_bias must be (dim={d},), got "
                                    f"{tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise InvalidParameterError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got "
                                    f"{tuple(z.shape)}")


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool,
                   dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False,
                       return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Plain sequential selective scan: one Python step per position, autograd for the gradients.

    The slow, obviously-correct version the fast :func:`selective_scan` is tested against. Same
    arguments and results as mamba-ssm's ``selective_scan_ref`` for real ``A`` and input-dependent
    ``B``/``C``; computes in float64 for float64 inputs and in float32 otherwise.

    Parameters
    ----------
    u : Tensor
        Input, ``(B, D, L)``.
    delta : Tensor
        Step sizes before ``delta_bias``/softplus, ``(B, D, L)``.
    A : Tensor
        State matrix (diagonal per channel, usually negative), ``(D, N)``.
    B, C : Tensor
        Input and output projections, ``(B, N, L)``.
    D : Tensor, optional
        Skip weight, ``(D,)``.
    z : Tensor, optional
        Gate, ``(B, D, L)``; the output is multiplied by ``silu(z)``.
    delta_bias : Tensor, optional
        Added to ``delta``, ``(D,)``.
    delta_softplus : bool
        Apply softplus to ``delta`` (after the bias).
    return_last_state : bool
        Also return the final state ``(B, D, N)``.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        ``out`` ``(B, D, L)`` in ``u``'s dtype, and the last state ``(B, D, N)`` if asked.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    uf = u.to(dtype)
    dt = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Af, Bf, Cf = A.to(dtype), B.to(dtype), C.to(dtype)
    # Per step slices come from unbind (one autograd node), not from indexing full tensors, whose
    # backward would write a full-size zero gradient per step.
    dts = dt.unbind(-1)
    dus = (dt * uf).unbind(-1)
    Bs, Cs = Bf.unbind(-1), Cf.unbind(-1)
    h = uf.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[-1]):
        h = torch.exp(dts[i][:, :, None] * Af) * h + dus[i][:, :, None] * Bs[i][:, None, :]
        ys.append((h * Cs[i][:, None, :]).sum(-1))
    out = _finish(torch.stack(ys, dim=-1), uf, D, z, dtype_in)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------------------
# Fast chunked scan (time-major core)
# ----------------------------------------------------------------------------------------------------------

def _chunked(x: Tensor, k: int, t: int) -> Tensor:
    """``(Bt, L, X)`` -> ``(Bt, K, T, X)``, zero-padded along time to ``K * T``."""
    bt, length, xdim = x.shape
    if k * t != length:
        x = F.pad(x, (0, 0, 0, k * t - length))
    return x.contiguous().view(bt, k, t, xdim)


def _chunk_groups(k: int, state_numel: int) -> list[slice]:
    """Chunks ``0..k`` in groups whose states ``(Bt, group, D, N)`` hold about :data:`_BLOCK_NUMEL` numbers.

    Every step of a sweep then works on a block that stays in the CPU cache: one block over all chunks of a
    64k-token sequence (64 MB) made each step memory-bound and the forward pass 1.6x slower.
    """
    g = max(1, min(k, _BLOCK_NUMEL // max(state_numel, 1)))
    return [slice(k0, min(k, k0 + g)) for k0 in range(0, k, g)]


class _Steps:
    """Operands of the recurrence in chunk layout ``(Bt, K, T, X)``.

    ``[:, ks, i]`` is step ``i`` of the chunks ``ks``.

    ``dt``, ``du``: ``(Bt, K, T, D)``; ``B``: ``(Bt, K, T, N)``; ``A``: ``(D, N)``.
    """

    def __init__(self, dt: Tensor, du: Tensor, A: Tensor, B: Tensor) -> None:
        self.dt, self.du, self.B, self.A = dt, du, B, A

    def decay(self, i: int, ks: slice, out: Tensor) -> Tensor:
        """``exp(dt * A)`` of step ``i`` for chunks ``ks`` into ``out`` ``(Bt, k, D, N)``."""
        return torch.exp(torch.mul(self.dt[:, ks, i, :, None], self.A, out=out), out=out)

    def step(self, i: int, ks: slice, h: Tensor, a: Tensor) -> Tensor:
        """``h <- exp(dt A) * h + dt u B`` in place for step ``i`` (``a`` is scratch)."""
        return h.mul_(self.decay(i, ks, a)).addcmul_(self.du[:, ks, i, :, None], self.B[:, ks, i, None, :])

    def chunk_decay(self) -> Tensor:
        """Whole-chunk decay ``exp(A * sum(dt))``, ``(Bt, K, D, N)``."""
        return torch.exp(self.dt.sum(2)[..., None] * self.A)


class _ChunkedScan(torch.autograd.Function):
    """Time-major scan: ``y[b, l, d] = sum_n C[b, l, n] h[b, l, d, n]``; see the module docstring."""

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                chunk: int) -> tuple[Tensor, Tensor]:
        bt, length, d = u.shape
        n = A.shape[1]
        t = min(chunk, length)
        k = -(-length // t)
        dtc = _chunked(dt, k, t)
        duc = _chunked(dt * u, k, t)
        bc = _chunked(B, k, t)
        steps = _Steps(dtc, duc, A, bc)
        groups = _chunk_groups(k, bt * d * n)

        # 1. local scan of every chunk from zero -> local end states
        ends = u.new_empty(bt, k, d, n)
        for ks in groups:
            h = u.new_zeros(bt, ks.stop - ks.start, d, n)
            a = torch.empty_like(h)
            for i in range(t):
                steps.step(i, ks, h, a)
            ends[:, ks] = h
        # 2. carry true states over chunk borders
        q = steps.chunk_decay()
        starts = u.new_empty(k, bt, d, n)
        starts[0].zero_()
        for j in range(1, k):
            torch.addcmul(ends[:, j - 1], q[:, j - 1], starts[j - 1], out=starts[j])
        last = torch.addcmul(ends[:, k - 1], q[:, k - 1], starts[k - 1])
        del ends
        # 3. scan again from the true start states, contracting with C at every step
        cc = _chunked(C, k, t)
        y = u.new_empty(bt, k, t, d)
        for ks in groups:
            h = starts[ks].permute(1, 0, 2, 3).clone(memory_format=torch.contiguous_format)  # never a view
            a = torch.empty_like(h)
            yi = u.new_empty(bt, ks.stop - ks.start, d, 1)
            for i in range(t):
                steps.step(i, ks, h, a)
                y[:, ks, i].copy_(torch.matmul(h, cc[:, ks, i, :, None], out=yi).squeeze(-1))
        ctx.save_for_backward(u, dtc, duc, A, bc, cc, starts)
        ctx.chunk = t
        return y.view(bt, k * t, d)[:, :length], last

    @staticmethod
    def backward(ctx, gy: Tensor | None, glast: Tensor | None):  # type: ignore[override]
        with torch.autocast(gy.device.type if gy is not None else "cpu", enabled=False):
            return _ChunkedScan._backward(ctx, gy, glast)

    @staticmethod
    def _backward(ctx, gy: Tensor | None, glast: Tensor | None):  # type: ignore[no-untyped-def]
        u, dtc, duc, A, bc, cc, starts = ctx.saved_tensors
        bt, length, d = u.shape
        n = A.shape[1]
        t = ctx.chunk
        k = -(-length // t)
        steps = _Steps(dtc, duc, A, bc)
        if gy is None:
            gy = u.new_zeros(u.shape)
        gyc = _chunked(gy.to(u.dtype), k, t)
        crow = cc  # (Bt, K, T, N)

        # Notation: g_i = dLoss/dh_i (total), w_i = a_i * g_i with a_i = exp(dt_i A), so that
        # g_i = C_i gy_i + w_{i+1}: a reverse recurrence with the same decays.
        # 1. local reverse scan of every chunk with nothing coming from the right -> w at chunk start
        w_all = u.new_empty(bt, k, d, n)
        for ks in _chunk_groups(k, bt * d * n):
            w = u.new_zeros(bt, ks.stop - ks.start, d, n)
            a = torch.empty_like(w)
            for i in reversed(range(t)):
                w.addcmul_(gyc[:, ks, i, :, None], crow[:, ks, i, None, :]).mul_(steps.decay(i, ks, a))
            w_all[:, ks] = w
        w = w_all
        # 2. carry over chunk borders: incoming[j] = true w at the start of chunk j + 1
        q = steps.chunk_decay()
        incoming = u.new_empty(k, bt, d, n)
        if glast is None:
            incoming[k - 1].zero_()
        else:
            incoming[k - 1].copy_(glast.to(u.dtype))
        for j in range(k - 1, 0, -1):
            torch.addcmul(w[:, j], q[:, j], incoming[j], out=incoming[j - 1])
        del w, w_all, a, q

        # 3. per group of chunks: recompute the states, run the exact reverse scan, accumulate gradients
        r = u.new_empty(bt, k, t, d)  # sum_n g B
        s_aq = u.new_empty(bt, k, t, d)  # sum_n A * dLoss/d(dt A)
        g_b = u.new_empty(bt, k, t, n)
        g_c = u.new_empty(bt, k, t, n)
        g_a = torch.zeros_like(A)
        per_chunk = t * bt * d * n
        group = max(1, min(k, _GROUP_NUMEL // max(per_chunk, 1)))
        hs_buffer = u.new_empty(t + 1, bt, group, d, n)
        for k0 in range(0, k, group):
            ks = slice(k0, min(k, k0 + group))
            kg = ks.stop - ks.start
            a = u.new_empty(bt, kg, d, n)
            hs = hs_buffer[:, :, :kg]  # hs[i] = state before step i
            hs[0].copy_(starts[ks].permute(1, 0, 2, 3))
            vec_d = u.new_empty(bt, kg, d, 1)
            vec_n = u.new_empty(bt, kg, 1, n)
            for i in range(t):
                torch.mul(hs[i], steps.decay(i, ks, a), out=hs[i + 1])
                hs[i + 1].addcmul_(steps.du[:, ks, i, :, None], steps.B[:, ks, i, None, :])
                g_c[:, ks, i].copy_(torch.matmul(gyc[:, ks, i, None, :], hs[i + 1], out=vec_n).squeeze(-2))
            g = torch.empty_like(a)
            qa = torch.zeros_like(a)
            w = incoming[ks].permute(1, 0, 2, 3).clone(memory_format=torch.contiguous_format)
            for i in reversed(range(t)):
                torch.addcmul(w, gyc[:, ks, i, :, None], crow[:, ks, i, None, :], out=g)  # g_i
                r[:, ks, i].copy_(torch.matmul(g, steps.B[:, ks, i, :, None], out=vec_d).squeeze(-1))
                g_b[:, ks, i].copy_(torch.matmul(steps.du[:, ks, i, None, :], g, out=vec_n).squeeze(-2))
                torch.mul(steps.decay(i, ks, a), g, out=w)  # w_i = a_i g_i
                hs[i].mul_(w)  # q_i = w_i * h_{i-1} = dLoss/d(dt_i A)
                qa.addcmul_(steps.dt[:, ks, i, :, None], hs[i])
                torch.sum(torch.mul(hs[i], A, out=a), -1, out=s_aq[:, ks, i])
            g_a += qa.sum((0, 1))
        del hs_buffer, hs
        rc = r.view(bt, k * t, d)[:, :length]
        g_u = dtc.view(bt, k * t, d)[:, :length] * rc
        g_dt = s_aq.view(bt, k * t, d)[:, :length].addcmul(u, rc)
        return (g_u, g_dt, g_a, g_b.view(bt, k * t, n)[:, :length], g_c.view(bt, k * t, n)[:, :length], None)


def scan_time_major(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int | None = None,
                    impl: str = "auto", D: Tensor | None = None, z: Tensor | None = None,
                    delta_bias: Tensor | None = None, delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`selective_scan` in time-major layout (what the Mamba mixer's projections give).

    Step-size bias and softplus, skip ``D`` and gate ``z`` are fused into the CPU kernels.

    Parameters
    ----------
    u, dt : Tensor
        Input and step sizes (before ``delta_bias`` and softplus, if given), ``(B, L, D)``.
    A : Tensor
        ``(D, N)``.
    B, C : Tensor
        ``(B, L, N)``.
    chunk_size : int, optional
        Steps per chunk; default chosen from the sizes.
    impl : str
        ``"fused"``: the compiled CPU kernels of :mod:`xtpath.models.cpu_scan`; ``"chunked"``: the eager
        PyTorch chunked scan (any device); ``"auto"``: fused for CPU tensors when numba is available.
    D : Tensor, optional
        Skip weight ``(D,)``: ``y += D u``.
    z : Tensor, optional
        Gate ``(B, L, D)``: ``y *= silu(z)`` (after the skip).
    delta_bias : Tensor, optional
        Added to ``dt``, ``(D,)``.
    delta_softplus : bool
        Apply softplus to ``dt`` (after the bias).

    Returns
    -------
    (Tensor, Tensor)
        ``y = sum_n C h`` (then skip and gate) ``(B, L, D)`` and the last state ``(B, D, N)``, both
        differentiable, in float64 for float64 ``u`` and float32 otherwise (also under autocast).
    """
    bt, length, d = u.shape
    n = A.shape[1]
    dtype = _compute_dtype(u)
    if length == 0:
        return u.new_zeros(u.shape, dtype=dtype), u.new_zeros(bt, d, n, dtype=dtype)
    chunk = chunk_size or default_chunk_size(length)
    fused = _use_fused(impl, u.device)
    with torch.autocast(u.device.type, enabled=False):  # always float32/64 inside, even under AMP
        args = [t.to(dtype) for t in (u, dt, A, B, C)]
        D, z, bias = (None if t is None else t.to(dtype) for t in (D, z, delta_bias))
        if fused:  # reads strided views: channel-major callers need no transposing copies
            return cpu_scan.fused_scan(*args, chunk, D=D, z=z, delta_bias=bias, delta_softplus=delta_softplus)
        if bias is not None:
            args[1] = args[1] + bias
        if delta_softplus:
            args[1] = F.softplus(args[1])
        y, last = _ChunkedScan.apply(*(t.contiguous() for t in args), chunk)
        if D is not None:
            y = y + args[0] * D
        return (y if z is None else y * F.silu(z)), last


def _use_fused(impl: str, device: torch.device) -> bool:
    if impl not in SCAN_IMPLS:
        raise InvalidParameterError(f"selective_scan: impl must be one of {', '.join(SCAN_IMPLS)}, "
                                    f"got {impl!r}")
    if impl == "fused":
        if device.type != "cpu":
            raise InvalidParameterError(f"selective_scan: impl='fused' runs on CPU tensors, these are on "
                                        f"{device}; use impl='auto'")
        if not cpu_scan.available():
            raise InvalidParameterError("selective_scan: impl='fused' needs numba (pip install numba); "
                                        "use impl='auto'")
        return True
    return impl == "auto" and device.type == "cpu" and cpu_scan.available()


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, chunk_size: int | None = None, impl: str = "auto"
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """Fast selective scan in PyTorch (any device), with mamba-ssm's ``selective_scan_fn`` signature.

    Gives the same values and gradients as :func:`selective_scan_ref` (up to float rounding) in a few
    dozen vectorised steps instead of ``L`` Python steps; see the module docstring for the algorithm.
    Works in float32 (float64 for float64 inputs); half-precision inputs are computed in float32.

    Parameters
    ----------
    u : Tensor
        Input, ``(B, D, L)``.
    delta : Tensor
        Step sizes before ``delta_bias``/softplus, ``(B, D, L)``.
    A : Tensor
        State matrix, ``(D, N)``; ``A = -exp(A_log)`` in Mamba, so ``exp(delta * A) <= 1``.
    B, C : Tensor
        Input-dependent input/output projections, ``(B, N, L)``.
    D : Tensor, optional
        Skip weight, ``(D,)``.
    z : Tensor, optional
        Gate, ``(B, D, L)``; the output is multiplied by ``silu(z)``.
    delta_bias : Tensor, optional
        Added to ``delta`` before the softplus, ``(D,)``.
    delta_softplus : bool
        Apply softplus to ``delta``.
    return_last_state : bool
        Also return the final state ``(B, D, N)`` (differentiable).
    chunk_size : int, optional
        Steps per chunk ``T``; default :func:`default_chunk_size` of ``L``. Results do not depend on it
        beyond float rounding.
    impl : str
        ``"auto"`` (fused compiled kernels for CPU tensors, else the chunked PyTorch scan), ``"fused"`` or
        ``"chunked"``.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        ``out`` ``(B, D, L)`` in ``u``'s dtype, and the last state ``(B, D, N)`` if asked.

    Raises
    ------
    InvalidParameterError
        If shapes do not match or ``chunk_size < 1``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size is not None and chunk_size < 1:
        raise InvalidParameterError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    dtype_in, dtype = u.dtype, _compute_dtype(u)
    t = lambda x: x.to(dtype).transpose(1, 2)  # noqa: E731
    y, last = scan_time_major(t(u), t(delta), A.to(dtype), t(B), t(C), chunk_size, impl, D=D,
                              z=None if z is None else t(z), delta_bias=delta_bias,
                              delta_softplus=delta_softplus)
    out = y.transpose(1, 2).to(dtype_in)
    return (out, last) if return_last_state else out
