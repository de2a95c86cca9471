"""Scan orders, token positions, the sin-cos embedding, grid validation."""

from __future__ import annotations

import pytest
import torch

from xtpath.errors import InvalidParameterError
from xtpath.models import scan_orders, sincos_2d, token_positions
from xtpath.models.orders import (column_order, hilbert_index, hilbert_order, inverse_permutation,
                                  nested_order, raster_order)
from xtpath.models.positions import check_grid

POS = torch.tensor([[1, 0], [0, 2], [0, 0], [2, 1], [1, 2]])


def test_raster_and_column_orders():
    assert POS[raster_order(POS)].tolist() == [[0, 0], [0, 2], [1, 0], [1, 2], [2, 1]]
    assert POS[column_order(POS)].tolist() == [[0, 0], [1, 0], [2, 1], [0, 2], [1, 2]]


def test_orders_depend_only_on_the_set_of_positions():
    perm = torch.tensor([3, 0, 4, 2, 1])
    for scan in ("xt", "raster", "cross", "hilbert"):
        a = [POS[p].tolist() for p in scan_orders(POS, scan)]
        b = [POS[perm][p].tolist() for p in scan_orders(POS[perm], scan)]
        assert a == b, scan


def test_cross_scan_has_four_orders_with_reverses():
    orders = scan_orders(POS, "cross")
    assert len(orders) == 4
    assert orders[1].tolist() == orders[0].flip(0).tolist()
    assert orders[3].tolist() == orders[2].flip(0).tolist()
    assert len(scan_orders(POS, "raster")) == 2 and len(scan_orders(POS, "xt")) == 1


def test_unknown_scan_lists_the_options():
    with pytest.raises(InvalidParameterError, match="cross"):
        scan_orders(POS, "zigzag")


def test_hilbert_curve_visits_edge_adjacent_cells():
    for order in (1, 2, 3, 4):
        side = 1 << order
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        d = hilbert_index(rows.flatten(), cols.flatten(), order)
        assert sorted(d.tolist()) == list(range(side * side))
        cells = torch.stack([rows.flatten(), cols.flatten()], 1)[torch.argsort(d)]
        steps = (cells[1:] - cells[:-1]).abs().sum(1)
        assert steps.eq(1).all()


def test_hilbert_order_of_a_sparse_non_square_grid():
    pos = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 0], [0, 5]])
    # first quadrant of the order-3 curve: (0,0) (0,1) (1,1) (1,0); (0,5) comes much later
    assert pos[hilbert_order(pos)].tolist() == [[0, 0], [1, 0], [1, 1], [0, 1], [0, 5]]


def test_nested_order_is_region_by_region():
    grid = torch.tensor([[0, 1], [0, 0]])
    pos = token_positions(grid, (2, 2))
    nested = pos[nested_order(pos, (2, 2))].tolist()
    assert nested == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos[raster_order(pos)].tolist()[:4] == [[0, 0], [0, 1], [0, 2], [0, 3]]


def test_inverse_permutation():
    perm = torch.tensor([2, 0, 3, 1])
    x = torch.tensor([10, 11, 12, 13])
    assert x[perm][inverse_permutation(perm)].tolist() == x.tolist()


def test_token_positions_are_global_token_coordinates():
    grid = torch.tensor([[0, 0], [2, 1]])
    pos = token_positions(grid, (2, 3))
    assert pos.shape == (12, 2)
    assert pos[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert pos[6:].tolist() == [[4, 3], [4, 4], [4, 5], [5, 3], [5, 4], [5, 5]]
    assert token_positions(grid, None) is grid


def test_sincos_values():
    emb = sincos_2d(torch.tensor([[0, 0], [3, 5]]), 8, temperature=100.0)
    # quarter = 2 frequencies: 1 and 100**-0.5 = 0.1; layout [sin(r f), cos(r f), sin(c f), cos(c f)]
    assert emb[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    f = torch.tensor([1.0, 0.1], dtype=torch.float64)
    expected = torch.cat([torch.sin(3 * f), torch.cos(3 * f), torch.sin(5 * f), torch.cos(5 * f)]).float()
    torch.testing.assert_close(emb[1], expected)
    with pytest.raises(InvalidParameterError, match="divisible by 4"):
        sincos_2d(torch.zeros(1, 2, dtype=torch.long), 6)


def test_check_grid_errors():
    with pytest.raises(InvalidParameterError, match=r"\(N, 2\)"):
        check_grid(torch.zeros(3, 3, dtype=torch.long), 3)
    with pytest.raises(InvalidParameterError, match="integer"):
        check_grid(torch.zeros(2, 2), 2)
    with pytest.raises(InvalidParameterError, match="3 regions"):
        check_grid(torch.tensor([[0, 0], [0, 1]]), 3)
    with pytest.raises(InvalidParameterError, match="same"):
        check_grid(torch.tensor([[0, 0], [0, 0]]), 2)
    with pytest.raises(InvalidParameterError, match="at least one region"):
        check_grid(torch.zeros(0, 2, dtype=torch.long), 0)
    assert check_grid(torch.tensor([[-3, 4]], dtype=torch.int32), 1).dtype == torch.long


def test_permute_rows_matches_indexing_values_and_gradients():
    from xtpath.models.orders import inverse_permutation, permute_rows

    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(7, generator=g) for _ in range(3)])
    inv = torch.stack([inverse_permutation(p) for p in perms])
    shared = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    batched = torch.randn(3, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 7, 5, dtype=torch.float64, generator=g)
    by_order = torch.stack([batched[k][perms[k]] for k in range(3)])
    for x, expected in ((shared, shared[perms]), (batched, by_order)):
        out = permute_rows(x, perms, inv)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        got, want = (torch.autograd.grad((t * w).sum(), x)[0] for t in (out, expected))
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x: permute_rows(x, perms, inv), (shared,))
