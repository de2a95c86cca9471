"""The Mamba mixer (mamba-ssm compatible), the kernel switch, and the lazy import of mamba_ssm."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from xtpath.errors import InvalidParameterError
from xtpath.models import ContextConfig, Mamba, MambaContext, selective_scan_ref
from xtpath.models.kernels import INSTALL_HINT, cuda_selective_scan, mamba_ssm_installed, use_cuda_kernel

MAMBA_SSM_NAMES = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                   "dt_proj.bias", "A_log", "D", "out_proj.weight"}


def test_parameters_shapes_and_init_match_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert set(shapes) == MAMBA_SSM_NAMES
    assert m.dt_rank == math.ceil(64 / 16) == 4
    assert shapes == {"in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
                      "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
                      "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128)}
    # S4D-real: A = -exp(A_log) = -(1..N) for every channel; D = 1
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, 17.0).repeat(128, 1))
    assert m.D.eq(1).all()
    # softplus(dt bias) is the initial step size, log-uniform in [0.001, 0.1]
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def mixer_reference(m: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's slow path (``Mamba.forward`` without kernels) written out with our reference scan."""
    length = hidden.shape[1]
    xz = (hidden @ m.in_proj.weight.t()).transpose(1, 2)  # (B, 2E, L)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :length])
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.t()).transpose(1, 2)
    A = -torch.exp(m.A_log.double())
    y = selective_scan_ref(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), m.D, z=z,
                           delta_bias=m.dt_proj.bias, delta_softplus=True)
    return y.transpose(1, 2) @ m.out_proj.weight.t()


@pytest.mark.parametrize("length", [1, 2, 3, 23])
def test_mixer_matches_the_mamba_ssm_slow_path(length):
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, backend="torch").double()
    with torch.no_grad():
        m.conv1d.bias.normal_()
    hidden = torch.randn(3, length, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, length, 8, dtype=torch.float64)
    expected = mixer_reference(m, hidden)
    grads_expected = torch.autograd.grad((expected * weights).sum(), [hidden, *m.parameters()])
    out = m(hidden)
    torch.testing.assert_close(out, expected)
    # gradients through our time-major conv, fused scan and gate equal nn.Conv1d + the reference scan's
    grads = torch.autograd.grad((out * weights).sum(), [hidden, *m.parameters()])
    names = ["hidden"] + [name for name, _ in m.named_parameters()]
    for name, g, ge in zip(names, grads, grads_expected):
        torch.testing.assert_close(g, ge, msg=f"gradient of {name}")
    with torch.no_grad():
        torch.testing.assert_close(m(hidden), expected)


def test_mixer_is_causal():
    torch.manual_seed(0)
    m = Mamba(8, d_state=4).double()
    hidden = torch.randn(1, 10, 8, dtype=torch.float64)
    changed = hidden.clone()
    changed[0, 6:] += 1.0
    a, b = m(hidden), m(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_kernel_switch():
    assert not use_cuda_kernel("torch", on_cuda=True)
    assert not use_cuda_kernel("auto", on_cuda=False)
    assert use_cuda_kernel("auto", on_cuda=True) == mamba_ssm_installed()
    with pytest.raises(InvalidParameterError, match="CUDA device"):
        use_cuda_kernel("cuda", on_cuda=False)


@pytest.mark.skipif(mamba_ssm_installed(), reason="mamba-ssm is installed")
def test_missing_kernels_error_names_the_install_command():
    with pytest.raises(InvalidParameterError) as err:
        cuda_selective_scan()
    assert INSTALL_HINT in str(err.value) and "backend" in str(err.value)


def test_forcing_the_kernel_on_cpu_is_a_clear_error():
    m = MambaContext(ContextConfig(d_model=8, n_layers=1, backend="cuda"))
    with pytest.raises(InvalidParameterError, match="backend='cuda'"):
        m(torch.randn(3, 8), torch.tensor([[0, 0], [0, 1], [1, 0]]), (1, 1))


def test_importing_models_does_not_import_mamba_ssm():
    code = "import sys, xtpath.models; print('mamba_ssm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and mamba_ssm_installed()),
                    reason="needs CUDA and mamba-ssm")
def test_kernel_path_matches_our_scan_with_the_same_weights():
    torch.manual_seed(0)
    cfg = ContextConfig(d_model=64, n_layers=2, backend="torch")
    ours = MambaContext(cfg).cuda()
    kernel = MambaContext(ContextConfig(d_model=64, n_layers=2, backend="cuda")).cuda()
    kernel.load_state_dict(ours.state_dict())
    grid = torch.stack(torch.meshgrid(torch.arange(12), torch.arange(20), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).cuda()
    results = []
    for model in (ours, kernel):
        x = torch.randn(240, 64, generator=torch.Generator().manual_seed(1)).cuda().requires_grad_()
        out = model(x, grid, (1, 1))
        (out.tokens.square().mean() + out.pooled.sum()).backward()
        results.append((out.tokens.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}))
    (t1, g1, p1), (t2, g2, p2) = results
    torch.testing.assert_close(t2, t1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-4)
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("flip", [False, True])
def test_block_equals_the_mean_of_the_mixer_over_scan_orders(flip):
    # the block projects once and reorders the projections; by definition it is the mean over orders of
    # the full mixer run on each order's sequence, put back in place
    from xtpath.models.mamba import MambaBlock
    from xtpath.models.orders import inverse_permutation, scan_orders

    torch.manual_seed(0)
    cfg = ContextConfig(name="mamba", d_model=16, n_layers=1, conv2d=0, backend="torch")
    block = MambaBlock(cfg).double()
    pos = torch.tensor([[r, c] for r in range(3) for c in range(4) if (r, c) != (1, 2)])  # a hole
    x = torch.randn(len(pos), 16, dtype=torch.float64, requires_grad=True)
    orders = scan_orders(pos, "cross")
    index = torch.stack(orders)
    inverse = torch.stack([inverse_permutation(o) for o in orders])
    out = block(x, None, index, inverse, flip)
    h = block.norm(x)
    outs = []
    for order, inv in zip(orders, inverse):
        seq = h[order][None]
        y = block.mixer(seq.flip(1) if flip else seq)[0]
        outs.append((y.flip(0) if flip else y)[inv])
    expected = h + torch.stack(outs).mean(0)
    torch.testing.assert_close(out, expected)
    g, ge = (torch.autograd.grad(t.square().sum(), x)[0] for t in (out, expected))
    torch.testing.assert_close(g, ge)


@pytest.mark.parametrize(("scan", "pool", "dtype"), [("cross", "mean", torch.float64), ("xt", "cls", torch.float64),
                                                      ("hilbert", "cls", torch.float32)])
def test_inference_reads_the_orders_through_the_index_and_matches_the_training_path(scan, pool, dtype):
    # Without gradients on CPU, the kernels read every order's rows straight from the tokens and add the
    # outputs back at their rows (no reordered copies of the projections); with gradients the block reorders
    # copies. Same weights, same numbers: several chunks, two channel blocks split between threads, holes,
    # xT's flipped layers and a CLS row.
    from xtpath.models import cpu_scan

    torch.manual_seed(0)
    cfg = ContextConfig(name="mamba", d_model=48, n_layers=2, scan=scan, pool=pool, dropout=0.0)
    enc = MambaContext(cfg).to(dtype).eval()
    keep = torch.randperm(110, generator=torch.Generator().manual_seed(1))[:90]
    pos = torch.stack([keep // 11, keep % 11], 1)
    x = torch.randn(len(pos), 48, dtype=dtype)
    calls = []
    real = cpu_scan.scan_orders_mean

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    cpu_scan.scan_orders_mean = counted
    try:
        with torch.no_grad():
            fast = enc(x, pos, (1, 1))
        assert len(calls) == 2  # one per layer: the indexed path ran
        slow = enc(x, pos, (1, 1))  # the weights need gradients: the reordering path
        assert len(calls) == 2
    finally:
        cpu_scan.scan_orders_mean = real
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(fast.tokens, slow.tokens.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(fast.pooled, slow.pooled.detach(), rtol=tol, atol=tol)
    assert not torch.equal(fast.tokens, x)


def test_the_indexed_kernels_refuse_gradients():
    from xtpath.models import cpu_scan

    x = torch.randn(5, 8, requires_grad=True)
    rows = torch.stack([torch.arange(5), torch.arange(5).flip(0)])
    with pytest.raises(RuntimeError, match=r"cpu_scan.conv_silu_orders has no backward; call it under "
                                           r"torch.no_grad\(\)"):
        cpu_scan.conv_silu_orders(x, torch.randn(8, 4), torch.zeros(8), rows)
    w, b = torch.randn(8, 4), torch.randn(8)
    with torch.no_grad():  # under no_grad: order k is conv + silu of the tokens taken in that order
        out = cpu_scan.conv_silu_orders(x, w, b, rows)
        for k in range(2):
            torch.testing.assert_close(out[k], cpu_scan.conv_silu(x[rows[k]][None], w, b)[0])
    assert not torch.allclose(out[0], out[1].flip(0))  # causal: the reversed order is not the same conv
