"""Fused CPU kernels of the Mamba mixer, compiled with numba: the selective scan and the causal conv + silu.

The scan is the recurrence of :mod:`xtpath.models.scan` done as it is written, one time step after another,
with every step's work for a block of 64 channels in one compiled loop: the block's states ``(N, 64)`` stay
in the L1 cache, every inner loop runs over the block's channels (contiguous, SIMD), and nothing of size
``B*D*N*L`` ever exists. The step-size bias and softplus, the skip ``D u`` and the gate ``silu(z)`` are
applied on the same tiles (a chunk of ``T`` steps x 64 channels), which are copied in and out of the
caller's tensors whatever their layout: channel-major ``(B, D, L)`` (mamba-ssm's API) and time-major
``(B, L, D)`` (the mixer's projections, often strided views) both work without transposing copies.
Channels are independent, so the channel range is split among ``torch.get_num_threads()`` Python threads
that run the kernels with the GIL released (``nogil``); no numba threading layer is involved, so the kernels
are safe in forked DataLoader workers and from threads.

Forward stores the state at the start of every chunk of ``T`` steps; backward walks the chunks from last to
first, recomputes a chunk's ``T`` states (and outputs, for the gate) from its stored start, in a buffer that
stays in the L2 cache, and runs the exact reverse-time recurrence through it, accumulating every gradient
in the same pass.

``exp`` is the costly part of a step (``N`` of them per channel and step). Float32 uses a vectorisable
``exp`` (``2**k * p(r)``, ``|r| <= ln2 / 2``, degree-6 Taylor polynomial, ``2**k`` written into the
float's exponent bits by a one-line LLVM bitcast, :func:`_pow2`): relative error below 3e-7, 3x faster than
calling libm per element. Being a plain scalar function, it is computed inside the loops that use it (the
state update, softplus, the gate, silu), with no pass of its own: measured at 10k tokens x 4 orders x 512
channels on 2 cores, in interleaved A/B runs against the earlier kernels (which kept ``2**k`` in a scratch
row, and computed softplus, the gate and silu in float64 because of int literals), the indexed forward scan
took 0.74-0.83x the time per layer and the default context's forward 0.72-0.92x (best of 6: 1.58 -> 1.13 s
in one run, 1.59 -> 1.46 s in another); backward is level or faster. Softplus's ``log1p`` is a short ``atanh``
series. Float64 calls ``math.exp``/``math.log1p``. The float64 kernels are what the tests compare with the
sequential reference (to 1e-10); float32 stays within 1e-5 of it.

Why written here: the eager-PyTorch chunked scan runs ~30 passes over ``B*D*N*L`` numbers at memory
bandwidth, 6x faster than the sequential reference at best; fusing them needs a compiled loop. Numba
compiles the kernels at first use (about 15 s, cached on disk next to this file or in numba's user cache
afterwards, then well under a second) and needs no C compiler. Measured (2 cores, L=4096, width 512, N 16):
forward 21 ms, backward 38 ms for the bare scan; the conv + silu at (4, 4096, 512) 29-35 ms forward and
39-54 ms backward, where ``nn.Conv1d`` with its transposes took about 0.3 s per layer (profiled).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but the eager chunked scan still works if it cannot be imported
    import numba
    from llvmlite import ir as llvm_ir
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only on platforms without numba wheels
    numba = None

__all__ = ["available", "fused_scan", "conv_silu", "conv_silu_orders", "scan_orders_mean"]

_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)
_LO = np.float32(-87.0)  # exp(-87) ~ 1.6e-38: still a normal float32
_HI = np.float32(88.0)
# float32 constants: an int literal in float32 arithmetic makes numba compute in float64 (half the SIMD width,
# and a float64 division)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_POLY = tuple(np.float32(1.0 / math.factorial(i)) for i in range(7))
_ATANH = tuple(np.float32(1.0 / (2 * i + 1)) for i in range(7))  # atanh(s) / s = sum s**2i / (2i + 1)
# Channels per block inside a thread: the backward buffers (T + 1 states and T decays per channel)
# stay in the L2 cache.
_BLOCK = 64


def available() -> bool:
    """Whether the fused CPU kernels can be used (numba imports)."""
    return numba is not None


def _njit(**options):  # type: ignore[no-untyped-def]
    """``numba.njit`` with our options, cached on disk when numba finds a writable place (next to this file
    or in the user's cache folder); on a read-only install with no writable home it compiles per process."""
    def decorate(fn):  # type: ignore[no-untyped-def]
        try:
            return numba.njit(nogil=True, fastmath=True, cache=True, error_model="numpy", **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, fastmath=True, cache=False, error_model="numpy", **options)(fn)
    return decorate


if numba is not None:
    _jit = _njit()

    # Layout inside the kernels: channels last and innermost, so that every inner loop runs over a block's
    # channels (long, contiguous, SIMD-friendly); the states of a block are (N, channels). ``At`` is
    # ``A`` transposed, (N, D); the stored chunk start states are (Bt, K, N, D).

    @intrinsic
    def _pow2(typingctx, k):  # type: ignore[no-untyped-def]
        """The float32 ``2**k`` for a whole-valued float ``k`` in [-126, 127]: ``k + 127`` written into the
        exponent bits (an LLVM bitcast, which numba has no scalar function for; it vectorises)."""
        if not isinstance(k, numba.types.Float):
            return None

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            i32 = llvm_ir.IntType(32)
            e = builder.add(builder.fptosi(args[0], i32), llvm_ir.Constant(i32, 127))
            return builder.bitcast(builder.shl(e, llvm_ir.Constant(i32, 23)), llvm_ir.FloatType())

        return numba.types.float32(k), codegen

    @_njit(inline="always")
    def _exp32(x):  # pragma: no cover - compiled
        """Float32 ``exp(x) = p(r) * 2**k``, ``x = k ln2 + r`` with ``|r| <= ln2/2``, ``p`` the degree-6
        Taylor polynomial of ``exp(r)`` (relative error < 3e-7); ``x`` is clamped to [-87, 88] so that
        ``2**k`` stays a normal float. A scalar function with no calls, so that loops using it vectorise
        (libm's scalar ``expf`` made the scan 3x slower)."""
        v = min(max(x, _LO), _HI)
        k = np.floor(v * _LOG2E + _HALF)
        r = v - k * _LN2
        p = _POLY[6]
        p = p * r + _POLY[5]
        p = p * r + _POLY[4]
        p = p * r + _POLY[3]
        p = p * r + _POLY[2]
        p = p * r + _POLY[1]
        return (p * r + _POLY[0]) * _pow2(k)

    @_njit(inline="always")
    def _exp(x, exact):  # pragma: no cover - compiled
        """``math.exp`` (float64 kernels, ``exact``) or :func:`_exp32`; ``exact`` is the same for a whole kernel
        call, so LLVM takes the test out of the loops (measured: as fast as two written-out loops)."""
        return math.exp(x) if exact else _exp32(x)

    @_njit(inline="always")
    def _exp_row(x, out, exact):  # pragma: no cover - compiled
        """``out[j] = exp(x[j])`` over 1-D rows."""
        for j in range(x.shape[0]):
            out[j] = _exp(x[j], exact)

    @_jit
    def _copy_tile(src, b, t0, s0, tile, to_tile):  # pragma: no cover - compiled
        """Copy between ``src[b, t0:t0 + T, s0:s0 + nd]`` and ``tile`` ``(T, nd)`` (``to_tile``: direction),
        walking ``src`` along its smaller stride: time for channel-major views, channels for time-major.
        Each inner loop runs over a 1-D slice, so that LLVM can specialise it for a unit stride."""
        steps, nd = tile.shape
        if src.strides[1] < src.strides[2]:
            for j in range(nd):
                col = src[b, t0:t0 + steps, s0 + j]
                if to_tile:
                    for i in range(steps):
                        tile[i, j] = col[i]
                else:
                    for i in range(steps):
                        col[i] = tile[i, j]
        else:
            for i in range(steps):
                row = src[b, t0 + i, s0:s0 + nd]
                tr = tile[i]
                if to_tile:
                    for j in range(nd):
                        tr[j] = row[j]
                else:
                    for j in range(nd):
                        row[j] = tr[j]

    @_jit
    def _rows_tile(src, rows, b, t0, s0, tile, weight, to_tile):  # pragma: no cover - compiled
        """Between token rows and a tile ``(T, nd)``: ``tile[i] = src[0, rows[b, t0 + i], s0:s0 + nd]``
        (``to_tile``) or ``src[0, rows[b, t0 + i], s0:s0 + nd] += weight * tile[i]``: order ``b``'s sequence read
        from, and added back into, tokens in their own order (``src`` ``(1, R, D)``, ``rows`` ``(Bt, L)``)."""
        steps, nd = tile.shape
        for i in range(steps):
            row = src[0, rows[b, t0 + i], s0:s0 + nd]
            tr = tile[i]
            if to_tile:
                for j in range(nd):
                    tr[j] = row[j]
            else:
                for j in range(nd):
                    row[j] += weight * tr[j]

    @_jit
    def _dt_tile(delta, b, t0, s0, pre, dtt, bias, softplus, exact, et):  # pragma: no cover
        """The step sizes of a tile ``(T, nd)``: ``pre = delta[b, t0:t0 + T, s0:s0 + nd] + bias``,
        ``dtt = softplus(pre)`` (or ``pre``) and ``et = exp(-|pre|)`` (for softplus's derivative in backward).

        ``softplus(x) = max(x, 0) + log1p(e)``, ``e = exp(-|x|)``; float32 takes ``log1p(e) = 2 atanh(s)``,
        ``s = e / (2 + e) <= 1/3``, by its series to ``s**13`` (relative error < 1e-8). One loop per row."""
        _copy_tile(delta, b, t0, s0, pre, True)
        for i in range(pre.shape[0]):
            pr = pre[i]
            dr = dtt[i]
            er = et[i]
            if not softplus:
                for j in range(pr.shape[0]):
                    x = pr[j] + bias[j]
                    pr[j] = x
                    dr[j] = x
            elif exact:
                for j in range(pr.shape[0]):
                    x = pr[j] + bias[j]
                    pr[j] = x
                    e = math.exp(-abs(x))
                    er[j] = e
                    dr[j] = max(x, _ZERO) + math.log1p(e)
            else:
                for j in range(pr.shape[0]):
                    x = pr[j] + bias[j]
                    pr[j] = x
                    e = _exp32(-abs(x))
                    er[j] = e
                    sv = e / (_TWO + e)
                    s2 = sv * sv
                    # written out, as exp's polynomial: a Horner loop over the tuple did not unroll into the same
                    # code (the indexed scan 199 vs 132 ms per layer)
                    p = _ATANH[6]
                    p = p * s2 + _ATANH[5]
                    p = p * s2 + _ATANH[4]
                    p = p * s2 + _ATANH[3]
                    p = p * s2 + _ATANH[2]
                    p = p * s2 + _ATANH[1]
                    p = p * s2 + _ATANH[0]
                    dr[j] = max(x, _ZERO) + _TWO * sv * p

    @_jit
    def _skip_gate(yt, ut, dl, zt, has_z, exact):  # pragma: no cover - compiled
        """``yt = (yt + dl ut) * silu(zt)`` over a tile ``(T, nd)`` (the skip, and the gate if ``has_z``)."""
        for i in range(yt.shape[0]):
            yl = yt[i]
            ul = ut[i]
            zl = zt[i]
            if not has_z:
                for j in range(yl.shape[0]):
                    yl[j] += dl[j] * ul[j]
            else:
                for j in range(yl.shape[0]):
                    zv = zl[j]
                    yl[j] = (yl[j] + dl[j] * ul[j]) * zv / (_ONE + _exp(-zv, exact))

    @_jit
    def _forward_kernel(u, delta, bias, softplus, At, B, C, Dv, z, has_z, exact, chunk, d0, d1,
                        y, starts, last, rows):  # pragma: no cover - compiled
        """Channels ``d0..d1``: ``y = (scan + Dv u) * silu(z)`` ``(Bt, L, D)`` (the gate only if ``has_z``),
        ``starts`` ``(Bt, K, N, D)``, ``last`` ``(Bt, N, D)``; ``dt = softplus(delta + bias)`` (or without the
        softplus).

        With ``rows`` ``(Bt, L)`` (not empty), the ``Bt`` sequences are orders of the same tokens: ``z`` is
        ``(1, R, D)`` in token order, read through ``rows``, and ``y`` ``(1, R, D)`` gets the mean over the
        orders, each output added at its token's row (``y`` must start at zero).

        Works a chunk of ``T`` steps at a time on contiguous tiles of ``u``, ``dt``, ``z`` and ``y``."""
        bt, length, _ = u.shape
        n_state = At.shape[0]
        indexed = rows.shape[0] > 0
        share = np.full(1, 1 / bt, u.dtype)[0]  # each order's share of the mean, in u's dtype
        for s0 in range(d0, d1, _BLOCK):
            s1 = min(d1, s0 + _BLOCK)
            nd = s1 - s0
            h = np.zeros((n_state, nd), u.dtype)
            dtt = np.empty((chunk, nd), u.dtype)
            pret = np.empty((chunk, nd), u.dtype)
            et = np.empty((chunk, nd), u.dtype)
            ut = np.empty((chunk, nd), u.dtype)
            yt = np.empty((chunk, nd), u.dtype)
            zt = np.empty((chunk, nd), u.dtype)
            du = np.empty(nd, u.dtype)
            al = At[:, s0:s1].copy()  # the block's A, contiguous rows
            dl = Dv[s0:s1]
            bl = bias[s0:s1]
            for b in range(bt):
                h[:] = 0
                for t0 in range(0, length, chunk):
                    steps = min(length, t0 + chunk) - t0
                    starts[b, t0 // chunk, :, s0:s1] = h
                    _dt_tile(delta, b, t0, s0, pret[:steps], dtt[:steps], bl, softplus, exact, et[:steps])
                    _copy_tile(u, b, t0, s0, ut[:steps], True)
                    for i in range(steps):
                        t = t0 + i
                        dtl = dtt[i]
                        ul = ut[i]
                        acc = yt[i]
                        for j in range(nd):
                            du[j] = dtl[j] * ul[j]
                            acc[j] = 0
                        bt_row = B[b, t]
                        ct_row = C[b, t]
                        for n in range(n_state):
                            bn = bt_row[n]
                            cn = ct_row[n]
                            hn = h[n]
                            ar = al[n]
                            for j in range(nd):  # the decay computed in the loop: 1.7x faster than a pass of its own
                                hv = _exp(dtl[j] * ar[j], exact) * hn[j] + du[j] * bn
                                hn[j] = hv
                                acc[j] += cn * hv
                    if has_z and indexed:
                        _rows_tile(z, rows, b, t0, s0, zt[:steps], share, True)  # weight unused
                    elif has_z:
                        _copy_tile(z, b, t0, s0, zt[:steps], True)
                    _skip_gate(yt[:steps], ut[:steps], dl, zt[:steps], has_z, exact)
                    if indexed:
                        _rows_tile(y, rows, b, t0, s0, yt[:steps], share, False)
                    else:
                        _copy_tile(y, b, t0, s0, yt[:steps], False)
                last[b, :, s0:s1] = h

    @_jit
    def _backward_kernel(u, delta, bias, softplus, At, B, C, Dv, z, has_z, gy, starts, glast, exact,
                         chunk, d0, d1, gu, gdelta, gAt, gB, gC, gD, gz, gbias):  # pragma: no cover
        """Channels ``d0..d1``: writes ``gu``, ``gdelta``, ``gz`` (if ``has_z``) ``(Bt, L, D)`` and entries
        ``d0..d1`` of ``gAt`` ``(N, D)``, ``gD`` and ``gbias``; adds this thread's share into ``gB``, ``gC``
        ``(Bt, L, N)``. ``gy`` is the gradient of the gated output; ``glast``: ``(Bt, N, D)``.

        The gate first: with ``s = sigmoid(z)`` and the scan output ``ys`` (recomputed with the states),
        ``dz = gy (ys + D u) s (1 + z (1 - s))`` and the scan sees ``gy silu(z)``, as does ``D u``.

        With ``g_t = dLoss/dh_t`` and ``w = a_{t+1} g_{t+1}`` carried backwards: ``g_t = C_t gy_t + w``;
        ``dB_t += g_t du_t``, ``dC_t += gy_t h_t``, ``d(du_t) = sum_n g_t B_t``; the decay
        ``a_t = exp(dt_t A)`` gets ``q = g_t a_t h_{t-1}``, giving ``d(dt_t) += sum_n q A`` and
        ``dA += q dt_t``.
        """
        bt, length, _ = u.shape
        n_state = At.shape[0]
        n_chunks = (length + chunk - 1) // chunk
        zero = u[0, 0, 0] * _ZERO  # a zero of u's dtype
        for s0 in range(d0, d1, _BLOCK):
            s1 = min(d1, s0 + _BLOCK)
            nd = s1 - s0
            hs = np.empty((chunk + 1, n_state, nd), u.dtype)  # hs[i] = state before step i of the chunk
            av = np.empty((chunk, n_state, nd), u.dtype)  # decays of the chunk's steps
            w = np.empty((n_state, nd), u.dtype)
            ga = np.zeros((n_state, nd), u.dtype)
            dtt = np.empty((chunk, nd), u.dtype)
            pret = np.empty((chunk, nd), u.dtype)
            et = np.empty((chunk, nd), u.dtype)
            ut = np.empty((chunk, nd), u.dtype)
            gyt = np.empty((chunk, nd), u.dtype)
            gut = np.empty((chunk, nd), u.dtype)
            gdtt = np.empty((chunk, nd), u.dtype)
            du = np.empty(nd, u.dtype)
            sq = np.empty(nd, u.dtype)
            yst = np.empty((chunk, nd), u.dtype)
            zt = np.empty((chunk, nd), u.dtype)
            gzt = np.empty((chunk, nd), u.dtype)
            e = np.empty(nd, u.dtype)
            dl = Dv[s0:s1]
            bl = bias[s0:s1]
            gdl = np.zeros(nd, u.dtype)
            gbl = np.zeros(nd, u.dtype)
            for b in range(bt):
                w[:] = glast[b, :, s0:s1]
                for c in range(n_chunks - 1, -1, -1):
                    t0 = c * chunk
                    steps = min(length, t0 + chunk) - t0
                    _dt_tile(delta, b, t0, s0, pret[:steps], dtt[:steps], bl, softplus, exact, et[:steps])
                    _copy_tile(u, b, t0, s0, ut[:steps], True)
                    _copy_tile(gy, b, t0, s0, gyt[:steps], True)
                    hs[0] = starts[b, c, :, s0:s1]
                    for i in range(steps):  # recompute the chunk's states
                        t = t0 + i
                        dtl = dtt[i]
                        ul = ut[i]
                        for j in range(nd):
                            du[j] = dtl[j] * ul[j]
                        ys = yst[i]
                        for j in range(nd):
                            ys[j] = 0
                        for n in range(n_state):
                            an = av[i, n]
                            ar = At[n, s0:s1]
                            for j in range(nd):
                                an[j] = _exp(dtl[j] * ar[j], exact)
                        # all decays first, then the states: 20 % faster backward than one n at a time
                        bt_row = B[b, t]
                        ct_row = C[b, t]
                        for n in range(n_state):
                            bn = bt_row[n]
                            cn = ct_row[n]
                            an = av[i, n]
                            hp = hs[i, n]
                            hn = hs[i + 1, n]
                            for j in range(nd):
                                hv = an[j] * hp[j] + du[j] * bn
                                hn[j] = hv
                                ys[j] += cn * hv
                    if has_z:
                        _copy_tile(z, b, t0, s0, zt[:steps], True)
                    for i in range(steps):  # through the gate and the skip
                        gyl = gyt[i]
                        ul = ut[i]
                        if has_z:
                            zl = zt[i]
                            gzl = gzt[i]
                            ys = yst[i]
                            for j in range(nd):
                                e[j] = -zl[j]
                            _exp_row(e, e, exact)
                            for j in range(nd):
                                sg = _ONE / (_ONE + e[j])
                                gzl[j] = gyl[j] * (ys[j] + dl[j] * ul[j]) * sg * (_ONE + zl[j] * (_ONE - sg))
                                gyl[j] = gyl[j] * zl[j] * sg
                        for j in range(nd):
                            gdl[j] += gyl[j] * ul[j]
                    for i in range(steps - 1, -1, -1):  # and walk back through them
                        t = t0 + i
                        dtl = dtt[i]
                        ul = ut[i]
                        gyl = gyt[i]
                        r = gut[i]  # sum_n g B, turned into the gradients of u and dt below
                        for j in range(nd):
                            du[j] = dtl[j] * ul[j]
                            r[j] = 0
                            sq[j] = 0
                        bt_row = B[b, t]
                        ct_row = C[b, t]
                        gbt_row = gB[b, t]
                        gct_row = gC[b, t]
                        for n in range(n_state):
                            bn = bt_row[n]
                            cn = ct_row[n]
                            an = av[i, n]
                            hp = hs[i, n]
                            hn = hs[i + 1, n]
                            wn = w[n]
                            gan = ga[n]
                            ar = At[n, s0:s1]
                            gb = zero
                            gc = zero
                            for j in range(nd):
                                g = cn * gyl[j] + wn[j]
                                gc += gyl[j] * hn[j]
                                gb += g * du[j]
                                r[j] += g * bn
                                q = g * an[j] * hp[j]
                                sq[j] += q * ar[j]
                                gan[j] += q * dtl[j]
                                wn[j] = an[j] * g
                            gbt_row[n] += gb
                            gct_row[n] += gc
                        gdtl = gdtt[i]
                        for j in range(nd):
                            gdtl[j] = ul[j] * r[j] + sq[j]
                            r[j] = dtl[j] * r[j] + gyl[j] * dl[j]
                        if softplus:  # d softplus(x) / dx = sigmoid(x), from e = exp(-|x|)
                            prl = pret[i]
                            el = et[i]
                            for j in range(nd):
                                num = el[j] if prl[j] < 0 else _ONE
                                gdtl[j] *= num / (_ONE + el[j])
                        for j in range(nd):
                            gbl[j] += gdtl[j]
                    _copy_tile(gu, b, t0, s0, gut[:steps], False)
                    _copy_tile(gdelta, b, t0, s0, gdtt[:steps], False)
                    if has_z:
                        _copy_tile(gz, b, t0, s0, gzt[:steps], False)
            gAt[:, s0:s1] = ga
            gD[s0:s1] = gdl
            gbias[s0:s1] = gbl


    @_jit
    def _conv_silu_pre(xr, wl, bl, t, ring, pre):  # pragma: no cover - compiled
        """``pre[j] = bl[j] + sum_k wl[k, j] x[t - (K-1) + k, c0 + j]`` (``wl``, ``bl``: the weights and bias of
        channels ``c0..c0 + nc``, contiguous); ``xr`` is row ``t`` of the sequence, channels ``c0..c0 + nc``.

        ``ring`` ``(K, nc)`` holds the last ``K`` rows of ``x`` (row ``t`` at ``t % K``, zeros before the
        start); this call copies row ``t`` in, so every other loop reads contiguous rows (``x`` is often a
        strided view, the first half of the mixer's input projection)."""
        n_taps = wl.shape[0]
        nc = pre.shape[0]
        slot = ring[t % n_taps]
        for j in range(nc):
            slot[j] = xr[j]
            pre[j] = bl[j]
        for k in range(n_taps):
            rr = ring[(t + 1 + k) % n_taps]  # row t - (K-1) + k
            wr = wl[k]
            for j in range(nc):
                pre[j] += wr[j] * rr[j]

    @_jit
    def _conv_silu_forward(x, wT, bias, exact, c0, c1, out, rows):  # pragma: no cover - compiled
        """``out = silu(causal depthwise conv(x))`` for channels ``c0..c1``; ``x``, ``out`` ``(B, L, C)``.

        With ``rows`` ``(B, L)`` (not empty), sequence ``b`` is ``x[0, rows[b]]``: orders of the same tokens,
        read from ``x`` ``(1, R, C)`` in token order."""
        bt, length, _ = out.shape
        indexed = rows.shape[0] > 0
        nc = c1 - c0
        ring = np.empty((wT.shape[0], nc), x.dtype)
        pre = np.empty(nc, x.dtype)
        wl = wT[:, c0:c1].copy()
        bl = bias[c0:c1].copy()
        for b in range(bt):
            ring[:] = 0
            for t in range(length):
                xr = x[0, rows[b, t], c0:c1] if indexed else x[b, t, c0:c1]
                _conv_silu_pre(xr, wl, bl, t, ring, pre)
                orow = out[b, t, c0:c1]
                for j in range(nc):
                    orow[j] = pre[j] / (_ONE + _exp(-pre[j], exact))

    @_jit
    def _conv_silu_backward(x, wT, bias, gout, exact, c0, c1, gx, gwT, gbias):  # pragma: no cover
        """Gradients of :func:`_conv_silu_forward` for channels ``c0..c1``: writes ``gx`` ``(B, L, C)`` and
        columns ``c0..c1`` of ``gwT`` ``(K, C)`` and ``gbias``."""
        bt, length, _ = x.shape
        n_taps = wT.shape[0]
        nc = c1 - c0
        ring = np.empty((n_taps, nc), x.dtype)
        pre = np.empty(nc, x.dtype)
        e = np.empty(nc, x.dtype)
        gp = np.empty(nc, x.dtype)
        gw = np.zeros((n_taps, nc), x.dtype)
        gb = np.zeros(nc, x.dtype)
        wl = wT[:, c0:c1].copy()
        bl = bias[c0:c1].copy()
        for b in range(bt):
            ring[:] = 0
            for t in range(length):
                _conv_silu_pre(x[b, t, c0:c1], wl, bl, t, ring, pre)
                for j in range(nc):
                    e[j] = -pre[j]
                _exp_row(e, e, exact)
                gr = gout[b, t, c0:c1]
                for j in range(nc):
                    sig = _ONE / (_ONE + e[j])
                    gp[j] = gr[j] * sig * (_ONE + pre[j] * (_ONE - sig))  # d silu(p) / dp
                    gb[j] += gp[j]
                for k in range(n_taps):  # rows before the start are zeros in the ring: no gw term
                    rr = ring[(t + 1 + k) % n_taps]
                    gwk = gw[k]
                    for j in range(nc):
                        gwk[j] += gp[j] * rr[j]
                # row t of gx gets its first contribution here (tap K-1), later ones from steps t+1..
                for k in range(n_taps - 1, -1, -1):
                    tt = t - (n_taps - 1) + k
                    if tt < 0:
                        break
                    wr = wT[k, c0:c1]
                    gxr = gx[b, tt, c0:c1]
                    if k == n_taps - 1:
                        for j in range(nc):
                            gxr[j] = wr[j] * gp[j]
                    else:
                        for j in range(nc):
                            gxr[j] += wr[j] * gp[j]
        gwT[:, c0:c1] = gw
        gbias[c0:c1] = gb


_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None
_pool_lock = threading.Lock()


def _ranges(d: int) -> list[tuple[int, int]]:
    """Split channels ``0..d`` among the torch thread count (contiguous, multiples of 16 where possible)."""
    workers = max(1, min(torch.get_num_threads(), d // 16 or 1))
    step = -(-d // workers)
    step = -(-step // 16) * 16 if d >= 16 * workers else step
    return [(d0, min(d, d0 + step)) for d0 in range(0, d, step)]


def _run(fn, ranges: list[tuple[int, int]]) -> None:
    """Run ``fn(d0, d1)`` for every range, in parallel threads when there is more than one."""
    if len(ranges) == 1:
        fn(*ranges[0])
        return
    global _pool, _pool_key
    with _pool_lock:
        key = (os.getpid(), len(ranges))  # threads do not survive fork: a child makes its own pool
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)  # the thread count changed: let the old threads go
            _pool = ThreadPoolExecutor(len(ranges), thread_name_prefix="xtpath-scan")
            _pool_key = key
        # submitted under the lock: another caller cannot shut this pool down in between
        futures = [_pool.submit(fn, *r) for r in ranges]
    for future in futures:
        future.result()


_NO_ROWS = np.zeros((0, 0), np.int64)  # "not indexed" for the kernels' ``rows``


def _np(x: Tensor) -> np.ndarray:
    """A numpy view of ``x`` with its strides (the kernels read strided ``(Bt, L, D)`` views, so that
    channel-major ``(B, D, L)`` tensors need no transposing copy)."""
    return x.detach().numpy()


def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                  delta_bias: Tensor | None, softplus: bool, chunk: int, y: Tensor,
                  rows: np.ndarray = _NO_ROWS) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run :func:`_forward_kernel` over the channel ranges in threads, writing ``y``: ``u``'s layout, or with
    ``rows`` the ``(1, R, D)`` token rows (``z`` then in token rows too). Returns what backward needs:
    ``A`` transposed, the skip and step-size bias vectors, the chunk start states and the last states."""
    bt, length, d = u.shape
    n = A.shape[1]
    At = A.detach().t().contiguous()
    Dv = u.new_zeros(d) if D is None else D.detach().contiguous()
    bias = u.new_zeros(d) if delta_bias is None else delta_bias.detach().contiguous()
    starts = u.new_empty(bt, -(-length // chunk), n, d)
    last = u.new_empty(bt, n, d)
    has_z = z is not None
    arrays = [_np(u), _np(delta), _np(bias), softplus]
    arrays += [_np(x) for x in (At, B, C, Dv, z if has_z else u)]
    outs = [y.numpy(), starts.numpy(), last.numpy(), rows]
    exact = u.dtype == torch.float64
    _run(lambda d0, d1: _forward_kernel(*arrays, has_z, exact, chunk, d0, d1, *outs), _ranges(d))
    return At, Dv, bias, starts, last


class _FusedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,  # type: ignore[override]
                D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, softplus: bool,
                chunk: int) -> tuple[Tensor, Tensor]:
        y = torch.empty_like(u)  # u's layout: time-major, or a transposed view of channel-major
        At, Dv, bias, starts, last = _scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, chunk, y)
        ctx.save_for_backward(u, delta, bias, At, B, C, Dv, z, starts)
        ctx.chunk, ctx.softplus = chunk, softplus
        ctx.has = (D is not None, delta_bias is not None)
        return y, last.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, gy: Tensor | None, glast: Tensor | None):  # type: ignore[override]
        u, delta, bias, At, B, C, Dv, z, starts = ctx.saved_tensors
        bt, _, d = u.shape
        n = At.shape[0]
        has_z = z is not None
        gy = torch.zeros_like(u) if gy is None else gy.to(u.dtype)
        glast = u.new_zeros(bt, n, d) if glast is None else glast.to(u.dtype).transpose(1, 2)
        ranges = _ranges(d)
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gAt, gD, gbias = torch.empty_like(At), torch.empty_like(Dv), torch.empty_like(bias)
        gz = torch.empty_like(z) if has_z else None
        gB = B.new_zeros((len(ranges),) + tuple(B.shape))  # one share per thread, summed below
        gC = torch.zeros_like(gB)
        arrays = [_np(u), _np(delta), _np(bias), ctx.softplus]
        arrays += [_np(x) for x in (At, B, C, Dv, z if has_z else u)] + [has_z]
        arrays += [_np(x) for x in (gy, starts, glast)] + [u.dtype == torch.float64, ctx.chunk]
        gz_np = gz.numpy() if has_z else gu.numpy()  # a placeholder the kernel never writes without z
        share = {r: i for i, r in enumerate(ranges)}

        def work(d0: int, d1: int) -> None:
            i = share[(d0, d1)]
            _backward_kernel(*arrays, d0, d1, gu.numpy(), gdelta.numpy(), gAt.numpy(), gB[i].numpy(),
                             gC[i].numpy(), gD.numpy(), gz_np, gbias.numpy())

        _run(work, ranges)
        has_D, has_bias = ctx.has
        return (gu, gdelta, gAt.t(), gB.sum(0), gC.sum(0), gD if has_D else None, gz,
                gbias if has_bias else None, None, None)


def fused_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
               D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
               delta_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """Time-major selective scan on CPU tensors with the fused kernels (float32 or float64, any strides).

    ``u``, ``delta``, ``z`` ``(Bt, L, D)``, ``A`` ``(D, N)``, ``B``, ``C`` ``(Bt, L, N)``, ``D`` and
    ``delta_bias`` ``(D,)``: the step size is ``dt = softplus(delta + delta_bias)`` (softplus if asked) and
    the result ``y = (scan + D u) * silu(z)`` ``(Bt, L, D)`` (skip and gate when given), with the last state
    ``(Bt, D, N)``; ``chunk`` is the spacing of the states kept for backward.
    """
    return _FusedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)


class _ConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        wT = w.t().contiguous()
        out = x.new_empty(x.shape)
        exact = x.dtype == torch.float64
        xa, wa, ba, oa = _np(x), _np(wT), _np(bias), out.numpy()
        _run(lambda c0, c1: _conv_silu_forward(xa, wa, ba, exact, c0, c1, oa, _NO_ROWS), _ranges(x.shape[2]))
        ctx.save_for_backward(x, wT, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: Tensor):  # type: ignore[override]
        x, wT, bias = ctx.saved_tensors
        gx = x.new_empty(x.shape)
        gwT, gbias = torch.empty_like(wT), torch.empty_like(bias)
        exact = x.dtype == torch.float64
        arrays = [_np(t) for t in (x, wT, bias, gout.to(x.dtype))]
        outs = [gx.numpy(), gwT.numpy(), gbias.numpy()]
        _run(lambda c0, c1: _conv_silu_backward(*arrays, exact, c0, c1, *outs), _ranges(x.shape[2]))
        return gx, gwT.t(), gbias


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``silu`` of a causal depthwise convolution on time-major CPU ``x`` ``(B, L, C)`` (any strides).

    ``y[b, l, c] = silu(bias[c] + sum_k weight[c, k] x[b, l - (K-1) + k, c])``, Mamba's ``conv1d`` +
    activation, one pass each way instead of ``nn.Conv1d``'s transposing copies (``weight`` ``(C, K)``).
    """
    return _ConvSilu.apply(x, weight, bias)


# -- inference over several orders of the same tokens ---------------------------------------------------------
# The context encoder runs K scan orders of one slide's tokens through the same mixer. Without gradients, the
# kernels read each order's rows straight from the tokens and add the outputs back at their tokens' rows, so
# the (K, L, channels) reordered copies of the input projection and of the outputs are never made (measured
# with the default context at 50k regions on 2 cores: forward 12.1 -> 10.6 s, peak memory 2.4 -> 1.5 GB).


def _no_grad(name: str, *tensors: Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"cpu_scan.{name} has no backward; call it under torch.no_grad() (training uses "
                           "fused_scan / conv_silu on reordered copies)")


def conv_silu_orders(x: Tensor, weight: Tensor, bias: Tensor, rows: Tensor) -> Tensor:
    """:func:`conv_silu` of ``K`` orders of the same tokens, without gradients: ``x`` ``(R, C)`` in token
    order (any strides), ``rows`` ``(K, L)`` long token indices; returns ``out`` ``(K, L, C)`` with
    ``out[k] = conv_silu(x[rows[k]])``."""
    _no_grad("conv_silu_orders", x, weight, bias)
    k, length = rows.shape
    out = x.new_empty(k, length, x.shape[1])
    wT = weight.detach().t().contiguous()
    exact = x.dtype == torch.float64
    xa, wa, ba, oa, ra = _np(x[None]), _np(wT), _np(bias.contiguous()), out.numpy(), _np(rows.contiguous())
    _run(lambda c0, c1: _conv_silu_forward(xa, wa, ba, exact, c0, c1, oa, ra), _ranges(x.shape[1]))
    return out


def scan_orders_mean(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, rows: Tensor,
                     D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                     delta_softplus: bool = False, n_rows: int | None = None) -> Tensor:
    """:func:`fused_scan` of ``K`` orders of the same tokens, averaged back in token order, without gradients.

    ``u``, ``delta`` ``(K, L, D)``, ``B``, ``C`` ``(K, L, N)`` are the orders' sequences; ``rows`` ``(K, L)``
    says which token each step is; ``z`` ``(R, D)`` is the gate in token order. Returns ``(R, D)``: for token
    ``r``, the mean over the orders of ``y_k`` at the step where order ``k`` holds ``r``
    (``R = n_rows``, or ``z``'s rows).
    """
    _no_grad("scan_orders_mean", u, delta, A, B, C, D, z, delta_bias)
    _, length, d = u.shape
    r = n_rows if n_rows is not None else (z.shape[0] if z is not None else length)
    y = u.new_zeros(1, r, d)  # the kernel adds each order's share
    _scan_forward(u, delta, A, B, C, D, None if z is None else z[None], delta_bias, delta_softplus, chunk, y,
                  _np(rows.contiguous()))
    return y[0]
