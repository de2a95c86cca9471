"""Shared fixtures of the model tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each model test on one intra-op thread (the CI box has 2 shared cores; threads only contend)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_grid(n: int, rows: int, cols: int, seed: int = 0,
                offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``n`` distinct random ``(row, col)`` cells of a ``rows x cols`` grid (holes elsewhere), shifted."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(rows * cols, generator=g)[:n]
    return torch.stack([cells // cols + offset[0], cells % cols + offset[1]], dim=1)


@pytest.fixture
def make_grid():
    """The :func:`random_grid` helper, as a fixture."""
    return random_grid
