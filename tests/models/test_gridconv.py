"""Depthwise convolution over a grid with holes: dense canvas, sparse gather and F.conv2d agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xtpath.models.gridconv import GridConv, GridLayout


def dense_reference(x, pos, weight, bias, height, width):
    canvas = torch.zeros(x.shape[1], height, width, dtype=x.dtype)
    canvas[:, pos[:, 0], pos[:, 1]] = x.t()
    out = F.conv2d(canvas[None], weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])[0]
    return out[:, pos[:, 0], pos[:, 1]].t()


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("dense", [True, False])
def test_layouts_match_conv2d(kernel, dense, make_grid):
    pos = make_grid(30, 7, 9, seed=kernel)
    pos = pos - pos.min(0).values
    torch.manual_seed(0)
    x = torch.randn(30, 4, dtype=torch.float64)
    conv = GridConv(4, kernel).double()
    layout = GridLayout(pos, kernel, dense=dense)
    expected = dense_reference(x, pos, conv.conv.weight, conv.conv.bias, layout.height, layout.width)
    torch.testing.assert_close(conv(x, layout), expected)


def test_holes_are_zeros_and_sparse_is_chosen_for_far_apart_tissue():
    # two tokens far apart: no neighbours, so only the centre tap and the bias act
    pos = torch.tensor([[0, 0], [500, 400]])
    layout = GridLayout(pos, 3)
    assert not layout.dense
    conv = GridConv(2, 3)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    centre = conv.conv.weight[:, 0, 1, 1]
    torch.testing.assert_close(conv(x, layout), x * centre + conv.conv.bias)


def test_neighbour_sum_on_a_line():
    pos = torch.tensor([[0, 0], [0, 1], [0, 2]])
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 0] = 1.0  # left neighbour: out[c] = x[c - 1]
    weight[0, 0, 1, 2] = 10.0  # right neighbour
    x = torch.tensor([[1.0], [2.0], [3.0]])
    for dense in (True, False):
        out = GridLayout(pos, 3, dense=dense).conv(x, weight, None)
        assert out.flatten().tolist() == [20.0, 31.0, 2.0]
