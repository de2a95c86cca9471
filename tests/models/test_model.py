"""XTModel: tasks and shapes, order handling, gradients to the features, input validation."""

from __future__ import annotations

import pytest
import torch

from xtpath.errors import InvalidParameterError
from xtpath.models import ContextConfig, HeadConfig, ModelOutput, XTConfig, XTModel

CTX = dict(d_model=16, n_layers=2, n_heads=2, attn_dim=8, d_state=4)
NAMES = ["mamba", "transformer", "abmil", "mean"]


def model(name="mamba", task="classification", token_grid=None, head=None, **ctx):
    torch.manual_seed(0)
    cfg = XTConfig(in_dim=6, num_classes=3, task=task, token_grid=token_grid,
                   context=ContextConfig(name=name, **{**CTX, **ctx}), head=head or HeadConfig(decoder_dim=8))
    return XTModel(cfg).eval()


def feats(n, token_grid=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *(token_grid or ()), 6, generator=g)


def main_output(out: ModelOutput) -> torch.Tensor:
    return next(t for t in (out.logits, out.region_logits, out.mask_logits) if t is not None)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("token_grid", [None, (2, 2)])
def test_task_shapes(name, token_grid, make_grid):
    grid = make_grid(9, 5, 6, offset=(3, -2))  # holes, offset
    x = feats(9, token_grid)
    out = model(name, "classification", token_grid)(x, grid)
    assert out.logits.shape == (3,) and out.region_logits is None and out.mask_logits is None
    assert out.embedding.shape == (16,)
    out = model(name, "region", token_grid)(x, grid)
    assert out.region_logits.shape == (9, 3) and out.logits is None
    m = model(name, "segmentation", token_grid, head=HeadConfig(upsample=4, decoder_dim=8))
    out = m(x, grid)
    side = 8 if token_grid else 1  # pooled features give region-level masks
    assert out.mask_logits.shape == (9, 3, side, side)
    assert m.cfg.mask_side == side


@pytest.mark.parametrize("name", NAMES)
def test_single_region_slide(name):
    for token_grid in (None, (2, 3)):
        for task in ("classification", "region", "segmentation"):
            out = model(name, task, token_grid)(feats(1, token_grid), torch.tensor([[5, 7]]))
            assert torch.isfinite(main_output(out)).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("task", ["classification", "region", "segmentation"])
def test_shuffling_rows_changes_nothing(name, task, make_grid):
    token_grid = (2, 2)
    m = model(name, task, token_grid)
    grid = make_grid(11, 5, 5)
    x = feats(11, token_grid)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = main_output(m(x, grid)), main_output(m(x[perm], grid[perm]))
    if task != "classification":
        a = a[perm]  # per-region outputs come back in the input order
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_moving_a_region(name, make_grid):
    m = model(name, "region")
    grid = make_grid(8, 4, 4)
    moved = grid.clone()
    moved[3] = torch.tensor([10, 10])
    x = feats(8)
    with torch.no_grad():
        a, b = m(x, grid).region_logits, m(x, moved).region_logits
    if name in ("mamba", "transformer"):
        assert not torch.allclose(a, b, atol=1e-4)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_translation_of_the_whole_grid_changes_nothing(make_grid):
    m = model("mamba")
    grid = make_grid(8, 4, 4)
    x = feats(8)
    with torch.no_grad():
        assert torch.equal(m(x, grid).logits, m(x, grid + torch.tensor([100, 7])).logits)


@pytest.mark.parametrize("name", NAMES)
def test_exact_gradients_to_features(name):
    m = model(name, "region", (2, 2)).double()
    grid = torch.tensor([[0, 0], [0, 1], [2, 1]])
    x = feats(3, (2, 2)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: m(f, grid).region_logits, (x,), eps=1e-6, atol=1e-6)


def test_forward_is_forward_features_then_head(make_grid):
    m = model("mamba", "segmentation", (2, 2))
    grid, x = make_grid(5, 3, 3), feats(5, (2, 2))
    with torch.no_grad():
        feats_out = m.forward_features(x, grid)
        assert feats_out.tokens.shape == (5, 2, 2, 16) and feats_out.inputs.shape == (5, 2, 2, 16)
        torch.testing.assert_close(m.forward_head(feats_out).mask_logits, m(x, grid).mask_logits)


def test_abmil_attention_per_region(make_grid):
    m = model("abmil", token_grid=(2, 2))
    out = m(feats(4, (2, 2)), make_grid(4, 3, 3))
    assert out.attention.shape == (4,)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


def test_concat_merge_and_mask_mpp():
    m = model("mean", "segmentation", (2, 2), head=HeadConfig(merge="concat", upsample=2, decoder_dim=8,
                                                             region_um=128.0))
    out = m(feats(2, (2, 2)), torch.tensor([[0, 0], [0, 1]]))
    assert out.mask_logits.shape == (2, 3, 4, 4)
    assert m.mask_mpp == 32.0
    assert model("mean").mask_mpp is None


def test_half_precision_features_are_accepted():
    m = model("mean")
    out = m(feats(3).half(), torch.tensor([[0, 0], [0, 1], [1, 1]]))
    assert out.logits.dtype == torch.float32


def test_input_errors():
    m = model("mean")
    grid = torch.tensor([[0, 0], [0, 1]])
    with pytest.raises(InvalidParameterError, match="in_dim=6"):
        m(torch.randn(2, 5), grid)
    with pytest.raises(InvalidParameterError, match="token_grid"):
        m(torch.randn(2, 2, 2, 6), grid)
    with pytest.raises(InvalidParameterError, match="floating"):
        m(torch.ones(2, 6, dtype=torch.long), grid)
    with pytest.raises(InvalidParameterError, match="same"):
        m(torch.randn(2, 6), torch.tensor([[1, 1], [1, 1]]))
    with pytest.raises(InvalidParameterError, match="3 rows"):
        m(torch.randn(2, 6), torch.tensor([[0, 0], [0, 1], [0, 2]]))
    with pytest.raises(InvalidParameterError, match=r"\(N, 2, 2, 6\)"):
        model("mean", token_grid=(2, 2))(torch.randn(2, 6), grid)


def test_config_errors_and_json_round_trip():
    with pytest.raises(InvalidParameterError, match="task"):
        XTConfig(in_dim=4, num_classes=2, task="detection")
    with pytest.raises(InvalidParameterError, match="token_grid"):
        XTConfig(in_dim=4, num_classes=2, token_grid=(0, 2))
    with pytest.raises(InvalidParameterError, match="upsample"):
        HeadConfig(upsample=3)
    with pytest.raises(InvalidParameterError, match="unknown fields"):
        XTConfig.from_dict({"in_dim": 4, "num_classes": 2, "colour": "red"})
    cfg = XTConfig(in_dim=4, num_classes=2, task="segmentation", token_grid=(8, 8),
                   context=ContextConfig(name="transformer", xl_chunk=64), head=HeadConfig(merge="concat"))
    again = XTConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.token_grid == (8, 8)
