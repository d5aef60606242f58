"""The metrics the ICH literature reports, computed the way it computed them.

The RSNA 2019 score is the weighted multi-label log loss: for every image i and label j,
    L_ij = -(y_ij log p_ij + (1 - y_ij) log(1 - p_ij)),  p clipped to [1e-15, 1 - 1e-15],
each image's loss is its weighted mean  sum_j w_j L_ij / sum_j w_j  (w = 2 for `any`, 1 for
each subtype), and the score is the mean over images. With every label present for every image
that equals the weighted mean of the per-label mean log losses, sum_j w_j mean_i(L_ij) / sum_j
w_j. A label unknown for an image (-1) leaves that term and its weight out of the image's mean.

Intervals: Wilson score intervals for proportions (Wilson 1927; the choice Newcombe 1998 and
Brown, Cai & DasGupta 2001 recommend over the Wald interval at small n), with Rao & Scott's
(1992) design-effect correction when the cases come in clusters (slices of one scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-15


def weighted_log_loss(y_true: np.ndarray, y_prob: np.ndarray, weights: Sequence[float]) -> float:
    """RSNA 2019 weighted multi-label log loss: the mean over rows of each row's weighted mean
    loss over its known labels; rows with no known label are left out (NaN when none is
    known)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    p = np.clip(np.asarray(y_prob, dtype=np.float64).reshape(y.shape), EPS, 1 - EPS)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64), y.shape) * (y >= 0)
    # Unknown cells carry weight 0; where() keeps their arbitrary loss out of the sum.
    losses = np.where(w > 0, -(y * np.log(p) + (1 - y) * np.log(1 - p)), 0.0)
    row_weight = w.sum(axis=1)
    scored = row_weight > 0
    if not scored.any():
        return float("nan")
    return float(((w * losses).sum(axis=1)[scored] / row_weight[scored]).mean())


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
    """Threshold maximising sensitivity + specificity - 1; 0.5 when that is undefined: with
    one class only, and when no cut does better than calling nothing positive (scores that
    rank the classes backwards or not at all). sklearn then offers its infinite first
    threshold; clipped to 1.0 it would call saturated float32 scores of exactly 1.0 positive,
    and kept infinite it would not be a probability, which every threshold here is."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true)
    keep = y >= 0
    if len(np.unique(y[keep])) < 2:
        return 0.5
    p = np.asarray(y_prob, dtype=np.float64)[keep]
    _require_finite(p)
    fpr, tpr, thr = roc_curve(y[keep], p)
    best = int(np.argmax(tpr - fpr))
    if not np.isfinite(thr[best]):
        return 0.5
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
    p = np.asarray(y_prob, dtype=np.float64)
    _require_finite(p[y >= 0])
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        return 0.5
    k = int(np.ceil(target * positives.size)) - 1
    return float(positives[min(max(k, 0), positives.size - 1)])


def _require_finite(p: np.ndarray) -> None:
    """Refuse NaN or infinite probabilities: compared with a threshold a NaN reads as a
    negative call and sorts first, so every figure built on it would be quietly wrong."""
    bad = int((~np.isfinite(p)).sum())
    if bad:
        raise ValueError(f"{bad} of {p.size} probabilities are not finite (NaN or inf)")


def _known_calls(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(which cases have a known label, their truth, their ``probability >= threshold``
    calls); raises ValueError on a non-finite probability among them."""
    y = np.asarray(y_true)
    keep = y >= 0
    p = np.asarray(y_prob, dtype=np.float64)[keep]
    _require_finite(p)
    return keep, y[keep].astype(bool), p >= threshold


def binary_counts(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> dict[str, int]:
    """Confusion-matrix counts of ``probability >= threshold`` over known labels; raises
    ValueError on a non-finite probability."""
    _, y, pred = _known_calls(y_true, y_prob, threshold)
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


def wilson_interval(successes: float, trials: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaNs with no trials). Counts may be effective,
    non-integer ones (see `clustered_wilson_interval`)."""
    from scipy.stats import norm

    if trials <= 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * np.sqrt(p * (1 - p) / trials + z2n / (4 * trials)) / (1 + z2n)
    # At p = 0 or 1 the bound is 0 or 1 exactly; rounding would leave 1e-17 off it.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= trials else min(1.0, centre + half)
    return float(lo), float(hi)


def clustered_wilson_interval(
    hits: np.ndarray, clusters: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Wilson interval of the proportion of ``hits`` when the cases come in ``clusters``
    (slices of one scan agree far more than slices of different scans).

    Rao & Scott (1992): the Wilson interval on the effective sample size n / deff, deff being
    the ratio of the between-cluster (ratio-estimator) variance to the binomial one, at least
    1. Left without their G/(G-1) factor, so one case per cluster gives Wilson's interval and
    identical cases within each cluster give Wilson's interval over the clusters. When every
    case is a hit or none is, the variance ratio is 0/0 and each cluster counts once.
    """
    hits = np.asarray(hits, dtype=bool)
    n = hits.size
    if n == 0:
        return (float("nan"), float("nan"))
    index = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    n_clusters = int(index.max()) + 1
    p = float(hits.mean())
    if p in (0.0, 1.0):
        n_eff = float(n_clusters)
    else:
        residual = np.bincount(index, weights=hits, minlength=n_clusters) - p * np.bincount(
            index, minlength=n_clusters
        )
        between = float((residual**2).sum()) / n**2
        deff = max(1.0, between / (p * (1 - p) / n))
        n_eff = n / deff
    return wilson_interval(p * n_eff, n_eff, level)


def operating_point_ci95(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float, clusters: np.ndarray | None = None
) -> dict[str, tuple[float, float]]:
    """95% Wilson intervals of sensitivity, specificity, PPV and NPV at a threshold (the
    clustered form when ``clusters`` gives each case's cluster); NaNs where undefined."""
    keep, truth, pred = _known_calls(y_true, y_prob, threshold)
    groups = None if clusters is None else np.asarray(clusters)[keep]
    # (cases the proportion is over, which of them count as hits)
    parts = {
        "sensitivity": (truth, pred),
        "specificity": (~truth, ~pred),
        "ppv": (pred, truth),
        "npv": (~pred, ~truth),
    }
    out = {}
    for name, (over, hit) in parts.items():
        if groups is None:
            out[name] = wilson_interval(float(hit[over].sum()), float(over.sum()))
        else:
            out[name] = clustered_wilson_interval(hit[over], groups[over])
    return out


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
