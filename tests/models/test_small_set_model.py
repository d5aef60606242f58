"""The small-set model's sum of votes: each member's logit bounded before the weighted sum,
the blob forest's vote for blood weighed more than its vote against."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.models.small_set import (
    BLOB_EXTRA_FOR_BLOOD,
    VOTE_BOUND,
    BoundedVotes,
    extra_for_blood,
    member_weights,
)
from ichscan.train.small_set import combine

WEIGHTS = member_weights(5, blob_forest=True)
EXTRA = extra_for_blood(5, BLOB_EXTRA_FOR_BLOOD)


def votes(bound: float | None = VOTE_BOUND, extra: list[float] | None = None) -> BoundedVotes:
    """The head as training builds it (``extra`` None), or symmetric (``extra`` [0, ...])."""
    return BoundedVotes(len(WEIGHTS), WEIGHTS, bound, EXTRA if extra is None else extra)


SYMMETRIC = [0.0] * len(WEIGHTS)


def test_one_members_confident_mistake_cannot_outvote_the_rest() -> None:
    """Eleven members lean towards blood; one pooled regression says −40 (a near-constant
    feature). Unbounded it decides the slice, bounded it counts as −6."""
    logits = torch.full((1, len(WEIGHTS)), 1.0)
    logits[0, 5] = -40.0
    assert votes(None)(logits).item() < 0
    assert votes()(logits).item() > 0
    at_bound = logits.clone()
    at_bound[0, 5] = -VOTE_BOUND
    assert torch.equal(votes()(logits), votes()(at_bound))


def test_inside_the_bound_it_is_the_plain_weighted_sum() -> None:
    logits = torch.empty(8, len(WEIGHTS)).uniform_(-VOTE_BOUND, VOTE_BOUND)
    want = logits @ torch.tensor(WEIGHTS)
    assert torch.allclose(votes(extra=SYMMETRIC)(logits)[:, 0], want, atol=1e-6)
    assert torch.allclose(votes(None, SYMMETRIC)(logits)[:, 0], want, atol=1e-6)
    blood = BLOB_EXTRA_FOR_BLOOD * logits[:, -1].clamp(min=0)
    assert torch.allclose(votes()(logits)[:, 0], want + blood, atol=1e-6)


def test_the_blob_forests_vote_for_blood_counts_twice_its_vote_against() -> None:
    """Only the blob forest (the last member) is asymmetric: +2 from it adds 1 to the sum,
    −2 takes 0.5 away; every other member counts the same both ways."""

    def alone(member: int, logit: float) -> float:
        x = torch.zeros(1, len(WEIGHTS))
        x[0, member] = logit
        return votes()(x).item()

    blob = len(WEIGHTS) - 1
    assert alone(blob, 2.0) == pytest.approx(1.0)
    assert alone(blob, -2.0) == pytest.approx(-0.5)
    for member in range(blob):
        assert alone(member, 2.0) == pytest.approx(-alone(member, -2.0))
    # bounded first: the extra weight cannot lift a vote past the bound
    assert alone(blob, 40.0) == pytest.approx(0.5 * VOTE_BOUND)


@pytest.mark.parametrize("extra", [[-0.1] + [0.0] * 11, [0.0] * 11, [float("nan")] * 12])
def test_a_broken_extra_weight_is_refused(extra: list[float]) -> None:
    with pytest.raises(ValueError, match="blob_extra_for_blood"):
        votes(extra=extra)


def test_it_loads_the_head_of_older_bundles() -> None:
    """The same state-dict keys as the nn.Linear head bundles before session 13 saved (the
    extra weights for blood come from bundle.json, not the state dict)."""
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
    assert abs(z) <= VOTE_BOUND * (sum(WEIGHTS) + sum(EXTRA)) + 1e-9
    higher = x.clone()
    higher[0, member] += raise_by
    assert head(higher).item() >= z - 1e-9


def test_training_combines_the_votes_as_the_model_does() -> None:
    """The calibrated threshold is chosen on ``combine``'s probabilities: they must be the
    model's own (mean over the two views of the bounded sum's sigmoid), the blob forest's
    vote for blood weighed as the model weighs it."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 8, size=(2, 16, len(WEIGHTS))).astype(np.float32)
    with torch.no_grad():
        p = torch.sigmoid(votes()(torch.from_numpy(logits)))[..., 0].mean(0).numpy()
    np.testing.assert_allclose(combine(logits), p, atol=1e-6)
