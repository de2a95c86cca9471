"""Context encoders: registry, shapes, order handling, XL memory stop-gradient."""

from __future__ import annotations

import pytest
import torch

from xtpath.errors import InvalidParameterError
from xtpath.models import CONTEXT_ENCODERS, ContextConfig, build_context_encoder, token_positions
from xtpath.models.context import register_context_encoder
from xtpath.models.mil import MeanContext

SMALL = dict(d_model=16, n_layers=2, n_heads=2, attn_dim=8, d_state=4)
ENCODERS = [("mamba", {}), ("mamba", {"scan": "xt"}), ("mamba", {"scan": "hilbert"}),
            ("mamba", {"pool": "cls"}), ("transformer", {}), ("transformer", {"pool": "cls", "xl_chunk": 4}),
            ("abmil", {}), ("mean", {})]


def test_registry_names_and_unknown_name():
    assert set(CONTEXT_ENCODERS) >= {"mamba", "transformer", "abmil", "mean"}
    with pytest.raises(InvalidParameterError) as err:
        build_context_encoder(ContextConfig(name="gru"))
    for name in ("abmil", "mamba", "mean", "transformer"):
        assert name in str(err.value)
    with pytest.raises(InvalidParameterError, match="already registered"):
        register_context_encoder("mean", MeanContext)


@pytest.mark.parametrize("name,extra", ENCODERS)
@pytest.mark.parametrize("n", [1, 7])
def test_shapes(name, extra, n, make_grid):
    torch.manual_seed(0)
    enc = build_context_encoder(ContextConfig(name=name, **SMALL, **extra)).eval()
    pos = make_grid(n, 4, 5)
    out = enc(torch.randn(n, 16), pos, (1, 1))
    assert out.tokens.shape == (n, 16) and out.pooled.shape == (16,)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    if name == "abmil":
        assert out.attention.shape == (n,)
        torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
        torch.testing.assert_close(out.pooled, out.attention @ out.tokens)
    if name == "mean":
        torch.testing.assert_close(out.pooled, out.tokens.mean(0))


@pytest.mark.parametrize("name,extra", ENCODERS)
def test_token_grids_with_holes(name, extra):
    torch.manual_seed(0)
    enc = build_context_encoder(ContextConfig(name=name, **SMALL, **extra)).eval()
    grid = torch.tensor([[0, 0], [0, 2], [3, 1]])  # holes between regions
    pos = token_positions(grid, (2, 2))
    out = enc(torch.randn(12, 16), pos, (2, 2))
    assert out.tokens.shape == (12, 16) and torch.isfinite(out.tokens).all()


def test_positions_matter_for_mamba_and_transformer_only(make_grid):
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    pos = make_grid(6, 4, 4)
    moved = pos.clone()
    moved[0] = torch.tensor([9, 9])
    for name in ("mamba", "transformer", "abmil", "mean"):
        enc = build_context_encoder(ContextConfig(name=name, **SMALL)).eval()
        a, b = enc(x, pos, (1, 1)), enc(x, moved, (1, 1))
        same = torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)
        assert same == (not enc.uses_positions), name


def test_xl_memory_is_detached_and_bounds_attention():
    torch.manual_seed(0)
    enc = build_context_encoder(ContextConfig(name="transformer", **SMALL, xl_chunk=4)).eval()
    x = torch.randn(12, 16, requires_grad=True)
    pos = torch.stack([torch.zeros(12, dtype=torch.long), torch.arange(12)], 1)
    out = enc(x, pos, (1, 1))
    out.tokens[8:].sum().backward()  # third chunk
    # the third chunk attends to the second chunk only through detached memory: no gradient reaches it
    assert x.grad[:8].abs().max() == 0
    assert x.grad[8:].abs().max() > 0
    # but its values do depend on the earlier chunks
    x2 = x.detach().clone()
    x2[0] += 5.0
    with torch.no_grad():
        assert not torch.allclose(enc(x2, pos, (1, 1)).tokens[8:], out.tokens[8:].detach())


def test_xl_without_memory_makes_chunks_independent():
    torch.manual_seed(0)
    cfg = ContextConfig(name="transformer", **SMALL, xl_chunk=4, xl_memory=False)
    enc = build_context_encoder(cfg).eval()
    x = torch.randn(8, 16)
    pos = torch.stack([torch.zeros(8, dtype=torch.long), torch.arange(8)], 1)
    x2 = x.clone()
    x2[0] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(enc(x, pos, (1, 1)).tokens[4:], enc(x2, pos, (1, 1)).tokens[4:])


def test_mamba_cross_scan_sees_both_sides():
    # with pool="mean" each token's output depends on tokens before and after it in raster order
    torch.manual_seed(0)
    enc = build_context_encoder(ContextConfig(name="mamba", **SMALL, conv2d=0)).eval()
    pos = torch.stack([torch.zeros(6, dtype=torch.long), torch.arange(6)], 1)
    x = torch.randn(6, 16, requires_grad=True)
    enc(x, pos, (1, 1)).tokens[2].sum().backward()
    assert (x.grad.abs().sum(1) > 0).all()


def test_config_validation_messages():
    with pytest.raises(InvalidParameterError, match="context.scan"):
        ContextConfig(scan="spiral")
    with pytest.raises(InvalidParameterError, match="n_heads"):
        ContextConfig(d_model=32, n_heads=5)
    with pytest.raises(InvalidParameterError, match="multiple of 4"):
        ContextConfig(d_model=30)
    with pytest.raises(InvalidParameterError, match="conv2d"):
        ContextConfig(conv2d=2)
    with pytest.raises(InvalidParameterError, match="backend"):
        ContextConfig(backend="triton")
    assert ContextConfig(scan="xt").resolved_conv2d == 0 and ContextConfig().resolved_conv2d == 3
    assert ContextConfig(d_model=768).resolved_dt_rank == 48


@pytest.mark.parametrize("name", ["mamba", "transformer"])
def test_checkpointing_gives_the_same_values_and_gradients(name, make_grid):
    pos = make_grid(10, 4, 4)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = build_context_encoder(ContextConfig(name=name, **SMALL, xl_chunk=4, checkpoint=ckpt))
        x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = enc(x, pos, (1, 1))
        (out.tokens.square().sum() + out.pooled.sum()).backward()
        results.append((out.tokens.detach(), x.grad, [p.grad for p in enc.parameters()]))
    (t1, g1, p1), (t2, g2, p2) = results
    torch.testing.assert_close(t2, t1)
    torch.testing.assert_close(g2, g1)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a)
