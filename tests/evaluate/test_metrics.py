"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.evaluate.metrics import (
    bootstrap_ci,
    calibrated_threshold,
    clustered_wilson_interval,
    operating_point,
    operating_point_ci95,
    roc_auc,
    threshold_for_sensitivity,
    weighted_log_loss,
    wilson_interval,
    youden_threshold,
)
from ichscan.labels import RSNA


def test_weighted_log_loss_by_hand() -> None:
    # Two images, RSNA order (any, epidural, intraparenchymal, intraventricular,
    # subarachnoid, subdural), weights 2,1,1,1,1,1 → denominator 2 * 7 = 14.
    y = np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    p = np.array([[0.9, 0.1, 0.8, 0.1, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]])
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    w = np.array([2, 1, 1, 1, 1, 1])
    expected = float((per * w).sum() / 14)
    assert weighted_log_loss(y, p, RSNA.weights) == pytest.approx(expected, rel=1e-12)
    # Hand arithmetic of the same figure, so the formula itself is pinned.
    by_hand = (
        2 * -math.log(0.9)
        + -math.log(0.9)
        + -math.log(0.8)
        + 3 * -math.log(0.9)
        + 2 * -math.log(0.8)
        + 5 * -math.log(0.9)
    ) / 14
    assert weighted_log_loss(y, p, RSNA.weights) == pytest.approx(by_hand, rel=1e-12)


def test_weighted_log_loss_equals_weighted_mean_of_label_losses() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 6))
    p = rng.uniform(0.01, 0.99, (50, 6))
    per_label = [
        -(y[:, j] * np.log(p[:, j]) + (1 - y[:, j]) * np.log(1 - p[:, j])).mean() for j in range(6)
    ]
    expected = np.dot(RSNA.weights, per_label) / sum(RSNA.weights)
    assert weighted_log_loss(y, p, RSNA.weights) == pytest.approx(expected)


def test_clipping_keeps_loss_finite() -> None:
    loss = weighted_log_loss(np.array([[1]]), np.array([[0.0]]), [1.0])
    assert loss == pytest.approx(-math.log(1e-15))


def test_unknown_labels_are_ignored() -> None:
    y = np.array([[1, -1], [0, -1]])
    p = np.array([[0.5, 0.9], [0.5, 0.9]])
    assert weighted_log_loss(y, p, [1, 1]) == pytest.approx(math.log(2))


def test_auc_and_single_class() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_operating_point_counts() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.1, 0.3])
    op = operating_point(y, p, 0.5)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (2, 1, 1, 3)
    assert op["sensitivity"] == pytest.approx(2 / 3)
    assert op["specificity"] == pytest.approx(3 / 4)
    assert op["ppv"] == pytest.approx(2 / 3)
    assert op["npv"] == pytest.approx(3 / 4)
    assert op["accuracy"] == pytest.approx(5 / 7)


def test_youden_separates_perfectly_separable_scores() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.7
    assert operating_point(y, p, t)["accuracy"] == 1.0


def test_calibrated_threshold_cuts_between_separable_classes() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.3, 0.6, 0.9, 0.95])
    t = calibrated_threshold(y, p)
    assert 0.3 < t < 0.6
    assert operating_point(y, p, t)["accuracy"] == 1.0


def test_calibrated_threshold_sits_where_the_classes_are_equally_likely() -> None:
    # Equal-variance logits at -1 and +1, balanced: the posterior is 0.5 at logit 0. Youden's
    # cut on the same scores is decided by the few that sit at it.
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(-1, 1, 3000), rng.normal(1, 1, 3000)])
    y = np.repeat([0, 1], 3000)
    assert calibrated_threshold(y, 1 / (1 + np.exp(-z))) == pytest.approx(0.5, abs=0.03)
    # with three negatives to each positive the cut moves up: accuracy, not balanced accuracy
    z3 = np.concatenate([rng.normal(-1, 1, 9000), rng.normal(1, 1, 3000)])
    y3 = np.repeat([0, 1], [9000, 3000])
    assert calibrated_threshold(y3, 1 / (1 + np.exp(-z3))) > 0.6


def test_calibrated_threshold_is_defined_for_degenerate_scores() -> None:
    assert calibrated_threshold(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9])) == 0.5
    # scores that rank backwards fall back to Youden's cut instead of an inverted one
    y = np.array([0, 0, 1, 1])
    p = np.array([0.9, 0.8, 0.2, 0.1])
    assert calibrated_threshold(y, p) == youden_threshold(y, p)


@given(st.lists(st.floats(0, 1), min_size=4, max_size=40))
@settings(max_examples=60, deadline=None)
def test_calibrated_threshold_is_a_probability(scores: list[float]) -> None:
    p = np.array(scores)
    y = (np.arange(len(p)) % 2).astype(int)
    assert 0.0 <= calibrated_threshold(y, p) <= 1.0


@given(st.lists(st.floats(0, 1), min_size=4, max_size=40), st.floats(0.05, 1.0))
@settings(max_examples=60, deadline=None)
def test_sensitivity_threshold_reaches_target(scores: list[float], target: float) -> None:
    p = np.array(scores)
    y = (np.arange(len(p)) % 2).astype(int)
    t = threshold_for_sensitivity(y, p, target)
    sens = (p[y == 1] >= t).mean()
    assert sens >= target - 1e-9


def test_bootstrap_ci_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    lo, hi = bootstrap_ci(y, p, n=300)
    assert lo < roc_auc(y, p) < hi


def test_weighted_log_loss_with_unknown_labels_is_the_row_wise_mean() -> None:
    # Row 0 has every label, row 1 only `any` (a subtype row missing from the CSV): each row
    # is its own weighted mean over its known labels, then the rows are averaged.
    y = np.array([[1, 0, 1, 0, 0, 0], [0, -1, -1, -1, -1, -1]])
    p = np.array([[0.9, 0.1, 0.8, 0.1, 0.1, 0.1], [0.4, 0.5, 0.5, 0.5, 0.5, 0.5]])
    row0 = (2 * -math.log(0.9) + -math.log(0.9) + -math.log(0.8) + 3 * -math.log(0.9)) / 7
    row1 = -math.log(0.6)
    assert weighted_log_loss(y, p, RSNA.weights) == pytest.approx((row0 + row1) / 2, rel=1e-12)
    # a row with no known label is left out, not counted as a loss of 0
    y3 = np.vstack([y, np.full(6, -1)])
    p3 = np.vstack([p, np.full(6, 0.5)])
    assert weighted_log_loss(y3, p3, RSNA.weights) == pytest.approx((row0 + row1) / 2)
    assert math.isnan(weighted_log_loss(np.full((2, 6), -1), p, RSNA.weights))


def test_youden_without_an_informative_cut_is_not_one() -> None:
    # Scores that rank backwards: no cut beats calling nothing positive. sklearn's infinite
    # threshold must not become 1.0, which calls a saturated float32 score of 1.0 positive.
    y = np.array([1, 1, 0, 0])
    assert youden_threshold(y, np.float32([0.1, 0.2, 0.8, 1.0])) == 0.5
    assert youden_threshold(y, np.full(4, 0.3)) == 0.5  # scores that do not rank at all
    assert youden_threshold(y, np.array([0.1, 0.2, 0.8, 0.9])[::-1]) == pytest.approx(0.8)


def test_nan_probabilities_are_refused_not_counted_as_negative() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, np.nan, 0.2, 0.1, 0.7, 0.3])
    with pytest.raises(ValueError, match="1 of 6 probabilities are not finite"):
        operating_point(y, p, 0.5)
    # sorted, a NaN came first and the threshold reached only 1/3 of the positives
    with pytest.raises(ValueError, match="not finite"):
        threshold_for_sensitivity(y, p, 2 / 3)
    with pytest.raises(ValueError, match="not finite"):
        youden_threshold(y, p)
    # a NaN whose label is unknown is not a figure's business
    y[1] = -1
    assert operating_point(y, p, 0.5)["sensitivity"] == 1.0


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score)
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombe(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_of_one_case() -> None:
    # sensitivity 1/1 is not "1.000": the interval spans most of [0, 1]
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=5e-5)
    assert np.isnan(wilson_interval(0, 0)).all()


def test_operating_point_intervals_come_from_the_confusion_matrix() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.3, 0.2, 0.55, 0.1, 0.4])
    ci = operating_point_ci95(y, p, 0.5)  # tp 2, fn 1, tn 3, fp 1
    assert ci["sensitivity"] == pytest.approx(wilson_interval(2, 3))
    assert ci["specificity"] == pytest.approx(wilson_interval(3, 4))
    assert ci["ppv"] == pytest.approx(wilson_interval(2, 3))
    assert ci["npv"] == pytest.approx(wilson_interval(3, 4))


def test_clustered_interval_counts_scans_not_slices() -> None:
    rng = np.random.default_rng(0)
    hits = rng.random(40) < 0.3
    # one slice per scan: the plain Wilson interval
    single = clustered_wilson_interval(hits, np.arange(40))
    assert single == pytest.approx(wilson_interval(hits.sum(), 40))
    # sixteen identical slices per scan carry one scan's information, not sixteen
    copies = clustered_wilson_interval(np.repeat(hits, 16), np.repeat(np.arange(40), 16))
    assert copies == pytest.approx(single)
    naive = wilson_interval(16 * hits.sum(), 16 * 40)
    assert naive[1] - naive[0] < 0.5 * (copies[1] - copies[0])
    # every slice a hit: each scan counts once
    assert clustered_wilson_interval(np.ones(32, bool), np.repeat([0, 1], 16)) == pytest.approx(
        wilson_interval(2, 2)
    )
    # operating_point_ci95 uses it when told the scans
    y = np.repeat([1, 0, 1, 0], 8)
    p = np.repeat([0.9, 0.1, 0.2, 0.3], 8)
    scans = np.repeat(np.arange(4), 8)
    ci = operating_point_ci95(y, p, 0.5, scans)
    assert ci["sensitivity"] == pytest.approx(wilson_interval(1, 2))
