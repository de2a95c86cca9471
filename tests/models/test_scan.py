"""The fast selective scans (fused CPU kernels and the eager chunked scan) against the plain sequential
reference (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xtpath.errors import InvalidParameterError
from xtpath.models import selective_scan, selective_scan_ref
from xtpath.models.scan import default_chunk_size, scan_time_major

IMPLS = ["fused", "chunked"]


def make_inputs(b, d, n, length, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, length, generator=g, dtype=dtype)
    delta = torch.randn(b, d, length, generator=g, dtype=dtype)
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype))
    B = torch.randn(b, n, length, generator=g, dtype=dtype)
    C = torch.randn(b, n, length, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    z = torch.randn(b, d, length, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def run(fn, inputs, seed=1, **kw):
    for t in inputs:
        t.grad = None
    u, delta, A, B, C, D, z, bias = inputs
    out, last = fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True,
                   **kw)
    g = torch.Generator().manual_seed(seed)  # the same loss weights whatever the dtype
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    loss.backward()
    return out.detach(), last.detach(), [t.grad.clone() for t in inputs]


def test_hand_computed_two_steps():
    # D=1 channel, N=1 state, L=2: h1 = dt1*B1*u1, h2 = exp(dt2*A)*h1 + dt2*B2*u2, y = C*h
    u = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    delta = torch.tensor([[[0.5, 0.25]]], dtype=torch.float64)
    A = torch.tensor([[-2.0]], dtype=torch.float64)
    B = torch.tensor([[[3.0, -1.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 4.0]]], dtype=torch.float64)
    h1 = 0.5 * 3.0 * 1.0
    h2 = math.exp(0.25 * -2.0) * h1 + 0.25 * -1.0 * 2.0
    expected = torch.tensor([[[2.0 * h1, 4.0 * h2]]], dtype=torch.float64)
    for fn, kw in ((selective_scan_ref, {}), (selective_scan, {"impl": "fused"}),
                   (selective_scan, {"impl": "chunked"})):
        out, last = fn(u, delta, A, B, C, return_last_state=True, **kw)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(last, torch.tensor([[[h2]]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_skip_and_gate_and_bias():
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(1, 3, 2, 5)]
    plain = selective_scan_ref(u, F.softplus(delta + bias[:, None]), A, B, C)
    full = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(full, (plain + u * D[:, None]) * F.silu(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,chunk", [
    ((1, 1, 1, 1), None),       # L = 1
    ((2, 3, 4, 1), 8),          # L = 1 with a larger chunk
    ((2, 4, 3, 37), 8),         # L not a multiple of the chunk, 5 chunks
    ((1, 5, 2, 64), 16),        # exact multiple
    ((3, 2, 5, 50), 50),        # one chunk
    ((2, 3, 3, 17), 1),         # chunk of one step
    ((1, 2, 16, 300), None),    # default chunk (18), 17 chunks
])
def test_fast_matches_reference_float64(shape, chunk, impl):
    assert_matches_reference(make_inputs(*shape), chunk, impl)


def assert_matches_reference(inputs, chunk, impl="chunked"):
    """Outputs, last state and every gradient of the fast scan equal the reference's (float64)."""
    out_r, last_r, grads_r = run(selective_scan_ref, inputs)
    out_f, last_f, grads_f = run(selective_scan, inputs, chunk_size=chunk, impl=impl)
    torch.testing.assert_close(out_f, out_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_f, last_r, rtol=1e-10, atol=1e-10)
    for name, gf, gr in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], grads_f, grads_r):
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("b,block_chunks,group_chunks", [(1, 1, 1), (2, 1, 1), (2, 2, 3), (1, 3, 2)])
def test_blocked_sweeps_match_reference(monkeypatch, b, block_chunks, group_chunks):
    # long sequences run each sweep a few chunks at a time (cache-sized blocks) and recompute the backward
    # states a group of chunks at a time; shrink both limits so that 11 chunks split unevenly here
    import xtpath.models.scan as scan

    d, n, length, chunk = 3, 4, 83, 8
    monkeypatch.setattr(scan, "_BLOCK_NUMEL", block_chunks * b * d * n)
    monkeypatch.setattr(scan, "_GROUP_NUMEL", group_chunks * chunk * b * d * n)
    assert len(scan._chunk_groups(11, b * d * n)) == -(-11 // block_chunks)
    assert_matches_reference(make_inputs(b, d, n, length, seed=3), chunk)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), d=st.integers(1, 150), n=st.integers(1, 5), length=st.integers(1, 70),
       chunk=st.one_of(st.none(), st.integers(1, 40)), seed=st.integers(0, 10_000),
       impl=st.sampled_from(IMPLS))
def test_fast_matches_reference_random_shapes(b, d, n, length, chunk, seed, impl):
    # up to 150 channels: several threads' channel ranges and several 64-channel blocks within one
    inputs = make_inputs(b, d, n, length, seed=seed)
    out_r, last_r, grads_r = run(selective_scan_ref, inputs)
    out_f, last_f, grads_f = run(selective_scan, inputs, chunk_size=chunk, impl=impl)
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last_f, last_r, rtol=1e-9, atol=1e-9)
    for gf, gr in zip(grads_f, grads_r):
        torch.testing.assert_close(gf, gr, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fast_scan(impl):
    u, delta, A, B, C, D, z, bias = make_inputs(1, 2, 3, 11)

    def f(u, delta, A, B, C):
        return selective_scan(u, delta, A, B, C, D=D.detach(), z=z.detach(), delta_bias=bias.detach(),
                              delta_softplus=True, chunk_size=4, impl=impl)

    assert torch.autograd.gradcheck(f, (u, delta, A, B, C), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_close_to_float64_reference(impl):
    # float32 runs the fused kernels' polynomial exp; outputs and gradients stay within the 1e-5 target
    inputs64 = make_inputs(1, 80, 16, 600, seed=3)
    with torch.no_grad():
        inputs64[2].mul_(4)  # stronger decay
    out64, _, grads64 = run(selective_scan_ref, inputs64)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    out32, _, grads32 = run(selective_scan, inputs32, impl=impl)
    assert out32.dtype == torch.float32
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731
    assert rel(out32, out64) < 1e-5
    for name, g32, g64 in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias"], grads32, grads64):
        assert rel(g32, g64) < 1e-5, name


def test_half_inputs_compute_in_float32_and_return_input_dtype():
    u, delta, A, B, C, *_ = [t.detach() for t in make_inputs(1, 2, 2, 9, dtype=torch.float32)]
    out = selective_scan(u.bfloat16(), delta, A, B, C)
    assert out.dtype == torch.bfloat16
    expected = selective_scan(u.bfloat16().float(), delta, A, B, C)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["time-major", "channel-major view"])
def test_time_major_core_matches_channel_major(impl, layout):
    u, delta, A, B, C, *_ = [t.detach() for t in make_inputs(2, 70, 4, 21)]
    dt = F.softplus(delta)
    if layout == "time-major":
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    else:  # what selective_scan passes: transposed views the fused kernels read without copying
        t = lambda x: x.transpose(1, 2)  # noqa: E731
    y, last = scan_time_major(t(u), t(dt), A, t(B), t(C), 5, impl=impl)
    ref, ref_last = selective_scan_ref(u, dt, A, B, C, return_last_state=True)
    torch.testing.assert_close(y.transpose(1, 2), ref)
    torch.testing.assert_close(last, ref_last)


def test_fused_scan_splits_channels_over_threads_with_the_same_result():
    inputs = make_inputs(2, 200, 3, 40, seed=5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, last1, grads1 = run(selective_scan, inputs, impl="fused")
        torch.set_num_threads(3)  # three threads, each with several 64-channel blocks
        out3, last3, grads3 = run(selective_scan, inputs, impl="fused")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out3, out1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last3, last1, rtol=1e-12, atol=1e-12)
    for g3, g1 in zip(grads3, grads1):
        torch.testing.assert_close(g3, g1, rtol=1e-10, atol=1e-10)


def test_impl_errors_name_the_parameter():
    u, delta, A, B, C, *_ = [t.detach() for t in make_inputs(1, 2, 2, 5)]
    with pytest.raises(InvalidParameterError, match="impl must be one of auto, fused, chunked"):
        selective_scan(u, delta, A, B, C, impl="numba")
    if torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="CPU tensors"):
            selective_scan(*(t.cuda() for t in (u, delta, A, B, C)), impl="fused")


def test_default_chunk_size():
    assert default_chunk_size(1) == 16
    assert default_chunk_size(4096) == 64
    assert default_chunk_size(65536) == 128


@pytest.mark.parametrize("fn", [selective_scan, selective_scan_ref])
def test_shape_errors_name_the_argument(fn):
    u, delta, A, B, C, D, z, bias = [t.detach() for t in make_inputs(1, 3, 2, 5)]
    with pytest.raises(InvalidParameterError, match="delta"):
        fn(u, delta[..., :4], A, B, C)
    with pytest.raises(InvalidParameterError, match="A must be"):
        fn(u, delta, A[:2], B, C)
    with pytest.raises(InvalidParameterError, match="B must be"):
        fn(u, delta, A, B[:, :1], C)
    with pytest.raises(InvalidParameterError, match="D must be"):
        fn(u, delta, A, B, C, D=D[:2])
    with pytest.raises(InvalidParameterError, match="u must be"):
        fn(u[0], delta, A, B, C)


def test_chunk_size_must_be_positive():
    u, delta, A, B, C, *_ = [t.detach() for t in make_inputs(1, 1, 1, 3)]
    with pytest.raises(InvalidParameterError, match="chunk_size"):
        selective_scan(u, delta, A, B, C, chunk_size=0)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("length", [1, 2, 37])
def test_fused_conv_silu_matches_conv1d(threads, length):
    # Mamba's causal depthwise conv + silu on time-major input, read from a strided view as the mixer does
    from xtpath.models import cpu_scan

    g = torch.Generator().manual_seed(length)
    xz = torch.randn(2, length, 2 * 70, generator=g, dtype=torch.float64)
    x = xz[..., :70].requires_grad_()
    w = torch.randn(70, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(70, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, length, 70, generator=g, dtype=torch.float64)
    expected = F.silu(F.conv1d(x.transpose(1, 2), w[:, None, :], bias, padding=3, groups=70)[..., :length])
    expected = expected.transpose(1, 2)
    grads_expected = torch.autograd.grad((expected * weights).sum(), [x, w, bias])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = cpu_scan.conv_silu(x, w, bias)
        grads = torch.autograd.grad((out * weights).sum(), [x, w, bias])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(["x", "weight", "bias"], grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    # float32 runs the polynomial exp inside silu: close to float64
    out32 = cpu_scan.conv_silu(x.detach().float(), w.detach().float(), bias.detach().float())
    expected = expected.detach()
    assert float((out32.double() - expected).abs().max() / expected.abs().max()) < 1e-5
