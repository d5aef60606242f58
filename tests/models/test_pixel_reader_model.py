"""The pixel reader's pooling: a slice's logit comes from its brain cells only."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.models.pixel_reader import CELL, PixelNet, brain_cells, pixel_logit, pooled


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-20, 20))
def test_the_slice_logit_lies_between_the_brain_cells_mean_and_their_largest(
    seed: int, shift: float
) -> None:
    """Log-sum-exp normalised by the cell count: never above the most blood-like cell (a
    slice is not called bloodier than its worst spot), never below the average."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randn(1, 10, 10, generator=g) * 3 + shift
    brain = torch.rand(1, 10, 10, generator=g) < 0.6
    brain[0, 0, 0] = True
    z = pooled(cells, brain)[0]
    inside = cells[brain]
    assert inside.mean() - 1e-4 <= z <= inside.max() + 1e-4


def test_only_brain_cells_count_and_a_blank_slice_gets_its_maps_mean() -> None:
    cells = torch.zeros(2, 4, 4)
    cells[:, 0, 0] = 50.0  # outside the brain: the skull base, say
    brain = torch.ones(2, 4, 4, dtype=torch.bool)
    brain[0, 0, 0] = False
    brain[1] = False
    z = pooled(cells, brain)
    assert abs(z[0].item()) < 1e-6
    assert z[1].item() == cells[1].mean().item()


def test_the_brain_cells_are_those_at_least_half_inside_the_crop() -> None:
    grey = torch.zeros(1, 32, 32)
    grey[0, :, : CELL // 2] = 0.5  # half of the first column of cells
    grey[0, :, CELL : CELL + CELL // 2 - 1] = 0.5  # less than half of the second
    cells = brain_cells(grey)
    assert cells.shape == (1, 4, 4)
    assert cells[0, :, 0].all() and not cells[0, :, 1:].any()


def test_a_whole_crop_gives_one_logit_per_slice() -> None:
    net = PixelNet().eval()
    with torch.no_grad():
        z = pixel_logit(net, torch.rand(3, 320, 320))
    assert z.shape == (3,) and torch.isfinite(z).all()
