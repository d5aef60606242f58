"""The small-set model's sum of votes: each member's logit bounded before the weighted sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.models.small_set import VOTE_BOUND, BoundedVotes, member_weights
from ichscan.train.small_set import combine

WEIGHTS = member_weights(5, blob_forest=True, pixel_reader=True)


def votes(bound: float | None = VOTE_BOUND) -> BoundedVotes:
    return BoundedVotes(len(WEIGHTS), WEIGHTS, bound)


def test_one_members_confident_mistake_cannot_outvote_the_rest() -> None:
    """Twelve members lean towards blood; one pooled regression says −60 (a near-constant
    feature). Unbounded it decides the slice, bounded it counts as −6."""
    logits = torch.full((1, len(WEIGHTS)), 1.5)
    logits[0, 5] = -60.0
    assert votes(None)(logits).item() < 0
    assert votes()(logits).item() > 0
    at_bound = logits.clone()
    at_bound[0, 5] = -VOTE_BOUND
    assert torch.equal(votes()(logits), votes()(at_bound))


def test_inside_the_bound_it_is_the_plain_weighted_sum() -> None:
    logits = torch.empty(8, len(WEIGHTS)).uniform_(-VOTE_BOUND, VOTE_BOUND)
    want = logits @ torch.tensor(WEIGHTS)
    assert torch.allclose(votes()(logits)[:, 0], want, atol=1e-6)
    assert torch.allclose(votes(None)(logits)[:, 0], want, atol=1e-6)


def test_it_loads_the_head_of_older_bundles() -> None:
    """The same state-dict keys as the nn.Linear head bundles before session 13 saved."""
    old = torch.nn.Linear(len(WEIGHTS), 1)
    assert votes().state_dict().keys() == old.state_dict().keys()
    assert not any(p.requires_grad for p in votes().parameters())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=len(WEIGHTS), max_size=len(WEIGHTS)),
    st.integers(0, len(WEIGHTS) - 1),
    st.floats(0, 1e4),
)
def test_the_sum_is_bounded_and_each_vote_only_pushes_its_own_way(
    logits: list[float], member: int, raise_by: float
) -> None:
    x = torch.tensor([logits], dtype=torch.float64)
    head = votes().double()
    z = head(x).item()
    assert abs(z) <= VOTE_BOUND * sum(WEIGHTS) + 1e-9
    higher = x.clone()
    higher[0, member] += raise_by
    assert head(higher).item() >= z - 1e-9


def test_training_combines_the_votes_as_the_model_does() -> None:
    """The calibrated threshold is chosen on ``combine``'s probabilities: they must be the
    model's own (mean over the two views of the bounded sum's sigmoid)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 8, size=(2, 16, len(WEIGHTS))).astype(np.float32)
    with torch.no_grad():
        p = torch.sigmoid(votes()(torch.from_numpy(logits)))[..., 0].mean(0).numpy()
    np.testing.assert_allclose(combine(logits), p, atol=1e-6)


class _OneCell(torch.nn.Module):
    """A pixel reader sure of blood in one 8 px cell (row 10, column 30 of the 40 x 40)."""

    def forward(self, half: torch.Tensor) -> torch.Tensor:
        cells = torch.full((len(half), half.shape[-2] // 4, half.shape[-1] // 4), -20.0)
        cells[:, 10, 30] = 20.0
        return cells


def test_the_explained_map_shows_where_the_pixel_reader_sees_blood(monkeypatch) -> None:
    """The small bleed the pixel reader was added for must reach the overlay: its cell lights
    up, weighted as it votes beside the MIL heads; outside the brain it adds nothing."""
    from ichscan.models.small_set import (
        MIL_WEIGHT,
        PIXEL_WEIGHT,
        Reader,
        SmallSetModel,
    )

    model = SmallSetModel(
        2, 0, (4, 3), pretrained="none", readers=[Reader("efficientnet_lite0")], pixel_reader=True
    ).eval()
    model.pixel_reader = _OneCell()
    # MIL heads unsure everywhere (probability 0.5), so the pixel reader's cell decides
    monkeypatch.setattr(model, "hemorrhage_map", lambda x: torch.zeros(len(x), 16, 16))
    x = torch.full((1, 3, 320, 320), 120, dtype=torch.uint8)
    x[:, 0, :, 160:] = 0  # brain plane: right half outside the brain
    heat = model.blood_map(x)[0]
    assert heat.shape == (320, 320)
    floor = MIL_WEIGHT * 0.5 / (MIL_WEIGHT + PIXEL_WEIGHT)
    assert torch.allclose(heat, torch.full_like(heat, floor))  # its cell is outside the brain
    x[:, 0] = 120
    heat = model.blood_map(x)[0]
    row, col = divmod(int(heat.argmax()), 320)
    assert abs(row - (10 * 8 + 4)) <= 4 and abs(col - (30 * 8 + 4)) <= 4
    # the cell, sure of blood, at its vote's weight (bilinear upsampling spreads one cell,
    # so about 12% of it is lost at the peak pixel)
    share = PIXEL_WEIGHT / (MIL_WEIGHT + PIXEL_WEIGHT)
    assert floor + 0.85 * share <= float(heat.max()) <= floor + share
    assert float(heat.min()) == pytest.approx(floor)
    model.pixel_reader = None  # a bundle from before session 19: the MIL map alone
    assert torch.allclose(model.blood_map(x), torch.full((1, 320, 320), 0.5))
