"""The metrics the ICH literature reports, computed the way it computed them.

The RSNA 2019 score is the weighted multi-label log loss: for every image i and label j,
    L_ij = -(y_ij log p_ij + (1 - y_ij) log(1 - p_ij)),  p clipped to [1e-15, 1 - 1e-15],
and the score is  sum_ij w_j L_ij / sum_ij w_j  with w = 2 for `any` and 1 for each subtype.
With every label present for every image the denominator is N * sum(w) = 7N, which equals the
weighted mean of the per-label mean log losses, sum_j w_j mean_i(L_ij) / sum_j w_j.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-15


def weighted_log_loss(y_true: np.ndarray, y_prob: np.ndarray, weights: Sequence[float]) -> float:
    """RSNA 2019 weighted multi-label log loss; rows with a label of -1 (unknown) for a label
    are left out of that label's terms (and of the denominator)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.clip(np.asarray(y_prob, dtype=np.float64).reshape(y.shape), EPS, 1 - EPS)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), y.shape)
    known = y >= 0
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    total = float((w * known).sum())
    if total == 0:
        return float("nan")
    return float((w * losses * known).sum() / total)


def roc_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (it is undefined there)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true)
    keep = y >= 0
    y, p = y[keep], np.asarray(y_prob)[keep]
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def youden_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (0.5 when undefined)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true)
    keep = y >= 0
    if len(np.unique(y[keep])) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y[keep], np.asarray(y_prob)[keep])
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def calibrated_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """The score at which a logistic (Platt) calibration of the scores crosses 0.5: the cut
    that maximises expected accuracy at the scores' own class balance. It reads every score,
    where Youden's J is decided by the one or two that sit at the best cut, so on a hundred
    nearly separable scores it moves less from one sample to the next (0.5 when undefined)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y_true)
    keep = y >= 0
    y = y[keep]
    if len(np.unique(y)) < 2:
        return 0.5
    p = np.clip(np.asarray(y_prob, dtype=np.float64)[keep], 1e-6, 1 - 1e-6)
    z = np.log(p / (1 - p))[:, None]
    # Almost unregularised: the crossing, not the slope, is what is wanted; a small penalty
    # keeps the slope finite when the classes separate completely.
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:  # scores that rank the classes backwards have no calibrated cut
        return youden_threshold(y, p)
    return float(1 / (1 + np.exp(intercept / slope)))


def threshold_for_sensitivity(y_true: np.ndarray, y_prob: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity reaches `target` (0.5 when undefined)."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        return 0.5
    k = int(np.ceil(target * positives.size)) - 1
    return float(positives[min(max(k, 0), positives.size - 1)])


def binary_counts(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y_true)
    keep = y >= 0
    y = y[keep].astype(bool)
    pred = np.asarray(y_prob)[keep] >= threshold
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "tn": int((~pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
    }


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def operating_point(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and accuracy at a threshold, with the counts."""
    c = binary_counts(y_true, y_prob, threshold)
    n = sum(c.values())
    return {
        "threshold": float(threshold),
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "npv": _ratio(c["tn"], c["tn"] + c["fn"]),
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        **{k: float(v) for k, v in c.items()},
    }


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    metric=roc_auc,
    *,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `metric` over resampled cases."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        v = metric(y[idx], p[idx])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)
