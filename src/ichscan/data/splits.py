"""Cross-validation folds and a hold-out set, grouped by patient and stratified by label.

A patient never sits in two folds, nor in both the hold-out and a fold: slices of one
patient are near-duplicates, and splitting them leaks. Stratification works on patients: a
patient is positive for a label if any of its rows is. Multi-label sets use iterative
stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the stratification of multi-label
data", the algorithm behind the `iterative-stratification` package the RSNA 2019 entries
used), applied here to patient groups; a single label reduces to stratified grouped k-fold.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ichscan.errors import IchscanError
from ichscan.labels import LabelSet


class SplitError(IchscanError, ValueError):
    """The requested split cannot be made (too few patients, bad k or hold-out fraction)."""


class SplitWarning(UserWarning):
    """The split was made but cannot be stratified as asked (a label with no positives...)."""


def assign_folds(
    df: pd.DataFrame,
    label_set: LabelSet,
    *,
    k: int = 5,
    seed: int = 0,
    holdout: float = 0.0,
    balance: str = "patients",
) -> pd.DataFrame:
    """A copy of `df` with `fold` (0..k-1, -1 in the hold-out) and `holdout` set.

    The hold-out fraction of patients is drawn first (grouped and stratified the same way),
    the folds from the rest. `balance="rows"` weights each patient by its number of rows, so
    folds hold similar numbers of slices rather than of patients. Same seed, same split.
    Labels that cannot be stratified (no positive or no negative patient) raise a
    SplitWarning; the messages are also left in ``out.attrs["split_warnings"]``.
    """
    if k < 2:
        raise SplitError(None, f"k-fold cross-validation needs k >= 2, got k={k}")
    if not 0.0 <= holdout < 1.0:
        raise SplitError(None, f"hold-out fraction must be in [0, 1), got {holdout}")
    if balance not in ("patients", "rows"):
        raise SplitError(None, f"balance must be 'patients' or 'rows', got {balance!r}")
    if "patient_id" not in df:
        raise SplitError(None, "the table has no patient_id column to group by")
    missing = [label for label in label_set.labels if label not in df]
    if missing:
        raise SplitError(None, f"the table lacks label column(s) {', '.join(missing)}")

    patients, positive, rows_per_patient = patient_labels(df, list(label_set.labels))
    if len(patients) < k:
        raise SplitError(None, f"{k} folds need at least {k} patients; there are {len(patients)}")
    messages = _unstratifiable(positive, list(label_set.labels))
    for message in messages:
        warnings.warn(message, SplitWarning, stacklevel=2)
    weights = rows_per_patient if balance == "rows" else np.ones(len(patients))
    rng = np.random.default_rng(seed)

    fold = np.full(len(patients), -1, dtype=np.int8)
    in_holdout = np.zeros(len(patients), dtype=bool)
    rest = np.arange(len(patients))
    if holdout > 0:
        side = _stratify(positive, [holdout, 1.0 - holdout], rng, weights, balance)
        in_holdout = side == 0
        rest = np.flatnonzero(~in_holdout)
        if not in_holdout.any():
            raise SplitError(
                None, f"a hold-out of {holdout:.0%} of {len(patients)} patient(s) is empty"
            )
    if len(rest) < k:
        raise SplitError(
            None,
            f"{k} folds need at least {k} patients; there are {len(rest)}"
            + (" outside the hold-out" if holdout > 0 else ""),
        )
    fold[rest] = _stratify(positive[rest], [1.0 / k] * k, rng, weights[rest], balance)

    row_patient = pd.Index(patients).get_indexer(df["patient_id"].astype(str))
    out = df.copy()
    out["fold"] = fold[row_patient].astype(np.int8)
    out["holdout"] = in_holdout[row_patient]
    out.attrs["split_warnings"] = messages
    return out


def patient_labels(
    df: pd.DataFrame, labels: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patient ids, [patient, label] bool positive if any row is 1, rows per patient)."""
    positive = df[labels].eq(1)
    grouped = positive.groupby(df["patient_id"].astype(str), sort=True)
    per_patient = grouped.any()
    sizes = grouped.size().to_numpy()
    return per_patient.index.to_numpy(), per_patient.to_numpy(dtype=bool), sizes


def _unstratifiable(positive: np.ndarray, labels: list[str]) -> list[str]:
    counts = positive.sum(axis=0)
    n = len(positive)
    messages = []
    for label, count in zip(labels, counts, strict=True):
        if count == 0:
            messages.append(f"label {label!r} has no positive patient: it cannot be stratified")
        elif count == n:
            messages.append(f"label {label!r} has no negative patient: it cannot be stratified")
    return messages


def iterative_stratification(
    y: np.ndarray,
    proportions: list[float],
    rng: np.random.Generator,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Assign each example (a patient) to one of len(proportions) subsets.

    Sechidis et al. 2011, Algorithm 1: take the label with the fewest examples still to be
    placed; give each of its examples (in random order) to the subset that most lacks that
    label, breaking ties by the subset that most lacks examples overall, then at random.
    Examples without any label fill the subsets that lack the most. `weights` (default 1)
    count an example as that many, e.g. its number of slices.
    """
    y = np.asarray(y, dtype=bool)
    if y.ndim == 1:
        y = y[:, None]
    n, n_labels = y.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    r = np.asarray(proportions, dtype=np.float64)
    r = r / r.sum()
    # Visiting examples in a seeded random order makes the ties (and so the split) depend on
    # the seed and nothing else.
    order = rng.permutation(n)
    y, w = y[order], w[order]

    wanted = w.sum() * r  # per subset
    wanted_label = np.outer(r, (y * w[:, None]).sum(axis=0))  # [subset, label]
    left_per_label = y.sum(axis=0).astype(np.int64)
    assigned = np.full(n, -1, dtype=np.int64)

    for _ in range(n_labels):
        if not left_per_label.any():
            break
        # The rarest label still present goes first: it is the hardest to spread evenly.
        counts = np.where(left_per_label > 0, left_per_label, np.iinfo(np.int64).max)
        label = _pick(np.flatnonzero(counts == counts.min()), rng)
        for i in np.flatnonzero(y[:, label] & (assigned < 0)):
            need = wanted_label[:, label]
            candidates = np.flatnonzero(need == need.max())
            if len(candidates) > 1:
                overall = wanted[candidates]
                candidates = candidates[overall == overall.max()]
            subset = _pick(candidates, rng)
            assigned[i] = subset
            wanted[subset] -= w[i]
            wanted_label[subset] -= y[i] * w[i]
            left_per_label -= y[i]
    for i in np.flatnonzero(assigned < 0):
        subset = _pick(np.flatnonzero(wanted == wanted.max()), rng)
        assigned[i] = subset
        wanted[subset] -= w[i]

    out = np.empty(n, dtype=np.int64)
    out[order] = assigned
    return out


def _stratify(
    y: np.ndarray,
    proportions: list[float],
    rng: np.random.Generator,
    weights: np.ndarray,
    balance: str,
) -> np.ndarray:
    assigned = iterative_stratification(y, proportions, rng, weights)
    # Swapping patients keeps the subsets' patient counts, not their row counts.
    if balance == "patients":
        assigned = refine_by_swaps(y, assigned, proportions, rng)
    return assigned


# A subset with no positive for a label it should hold at least one of costs this much more
# than any imbalance in the counts, so the swaps fix that first.
_EMPTY_PENALTY = 1e6
MAX_SWAPS = 10_000


def refine_by_swaps(
    y: np.ndarray,
    assigned: np.ndarray,
    proportions: list[float],
    rng: np.random.Generator,
    max_swaps: int = MAX_SWAPS,
) -> np.ndarray:
    """Greedy swaps of two patients between subsets while that brings each label's
    per-subset positive counts closer to their share, above all filling subsets left without
    a positive of a label they should hold (iterative stratification places a patient by
    the rarest of its labels only, so a commoner label can end up missing from a fold).

    Patients with the same label vector are interchangeable, so the search runs over label
    profiles (at most 2^labels, a few dozen in practice): each step costs the same for a
    hundred patients as for a hundred thousand. Subset sizes in patients never change.
    """
    y = np.asarray(y, dtype=bool)
    if y.ndim == 1:
        y = y[:, None]
    assigned = assigned.copy()
    n_subsets = len(proportions)
    r = np.asarray(proportions, dtype=np.float64) / np.sum(proportions)
    profiles, profile_of = np.unique(y, axis=0, return_inverse=True)
    profiles = profiles.astype(np.float64)
    members = np.zeros((n_subsets, len(profiles)), dtype=np.int64)
    np.add.at(members, (assigned, profile_of.ravel()), 1)

    total = y.sum(axis=0).astype(np.float64)
    desired = np.outer(r, total)
    weight = 1.0 / np.maximum(total, 1.0)  # a rare label's imbalance matters more
    must_hold = desired >= 1.0 - 1e-9

    def cost(counts: np.ndarray, row: np.ndarray) -> np.ndarray:
        off = ((counts - desired[row]) ** 2 * weight).sum(axis=-1)
        return off + _EMPTY_PENALTY * ((counts < 0.5) & must_hold[row]).sum(axis=-1)

    for _ in range(max_swaps):
        counts = members @ profiles  # [subset, label]
        best = (-1e-9, None)
        for a in range(n_subsets):
            for b in range(a + 1, n_subsets):
                u = np.flatnonzero(members[a])
                v = np.flatnonzero(members[b])
                # a gives a patient of profile u and takes one of profile v; b the reverse.
                delta = profiles[v][None, :, :] - profiles[u][:, None, :]
                before = cost(counts[a], np.array(a)) + cost(counts[b], np.array(b))
                after = cost(counts[a] + delta, np.array(a)) + cost(counts[b] - delta, np.array(b))
                gain = after - before
                i, j = np.unravel_index(np.argmin(gain), gain.shape)
                if gain[i, j] < best[0]:
                    best = (gain[i, j], (a, b, u[i], v[j]))
        if best[1] is None:
            break
        a, b, pu, pv = best[1]
        out_of_a = rng.choice(np.flatnonzero((assigned == a) & (profile_of.ravel() == pu)))
        out_of_b = rng.choice(np.flatnonzero((assigned == b) & (profile_of.ravel() == pv)))
        assigned[out_of_a], assigned[out_of_b] = b, a
        members[a, pu] -= 1
        members[b, pu] += 1
        members[b, pv] -= 1
        members[a, pv] += 1
    return assigned


def _pick(candidates: np.ndarray, rng: np.random.Generator) -> int:
    return int(candidates[0] if len(candidates) == 1 else rng.choice(candidates))


def fold_summary(df: pd.DataFrame, label_set: LabelSet) -> pd.DataFrame:
    """Per fold (and the hold-out as -1): rows, patients and positive rows per label."""
    grouped = df.groupby("fold")
    summary = pd.DataFrame({"rows": grouped.size(), "patients": grouped["patient_id"].nunique()})
    positives = df[list(label_set.labels)].eq(1).groupby(df["fold"]).sum()
    return summary.join(positives)
