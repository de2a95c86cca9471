"""The synthetic arrangement-task slides."""

from __future__ import annotations

import pytest
import torch

from xtpath.errors import InvalidParameterError
from xtpath.models.synthetic import arrangement_slides


def test_labels_and_marked_regions():
    slides = arrangement_slides(40, rows=8, cols=9, dim=16, holes=0.2, far=3, seed=5)
    assert [s.label for s in slides[:4]] == [1, 0, 1, 0]
    for s in slides:
        n = s.features.shape[0]
        assert s.features.shape == (n, 16) and s.grid.shape == (n, 2)
        assert torch.unique(s.grid, dim=0).shape[0] == n
        assert s.grid[:, 0].max() < 8 and s.grid[:, 1].max() < 9
        a, b = s.grid[s.marked]
        d = (a - b).abs()
        if s.label == 1:
            assert int(d.sum()) == 1
        else:
            assert int(d.max()) >= 3
        # the two marked regions are of the same (extra) type, different from every other region
        f = s.features
        others = torch.ones(n, dtype=torch.bool)
        others[s.marked] = False
        assert (f[s.marked[0]] - f[s.marked[1]]).norm() < (f[s.marked[0]] - f[others]).norm(dim=1).min()


def test_same_world_for_training_and_test_sets():
    a = arrangement_slides(2, seed=1, noise=0.0)
    b = arrangement_slides(2, seed=2, noise=0.0)
    torch.testing.assert_close(a[0].features[a[0].marked[0]], b[1].features[b[1].marked[1]])


def test_bad_arguments():
    with pytest.raises(InvalidParameterError, match="far"):
        arrangement_slides(4, rows=3, cols=3, far=3)
