"""Score saved per-fold member logits (cv_members.py) under a combination rule and a
threshold rule: pooled AUC, accuracy at each fold's own inner-CV threshold, the errors.

    .venv/bin/python research/recipe_lab/score_members.py RUN.npz [RUN2.npz ...]
        [--weights W1,W2,...] [--threshold youden|youden-mid|half|platt] [--views N]

A run given as A.npz+B.npz joins the member logits of runs on the same folds (another
backbone): the weights apply to each and are shared between them, unless given for all.
"""

from __future__ import annotations

import argparse

import numpy as np

from ichscan.evaluate.metrics import roc_auc, youden_threshold
from ichscan.models.small_set import member_weights


def combine(logits: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = logits @ w
    return (1.0 / (1.0 + np.exp(-z))).mean(axis=0)


def threshold(rule: str, y: np.ndarray, logits: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    if rule == "half":
        return 0.5
    if rule == "youden":
        return youden_threshold(y, p)
    if rule == "youden-mid":  # the middle of the interval of cuts that all reach the best J
        from sklearn.metrics import roc_curve

        fpr, tpr, thr = roc_curve(y, p)
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - 1e-12)
        hi = thr[best.min()]  # the highest cut with the best J
        below = p[p < thr[best.max()]]
        lo = below.max() if below.size else 0.0  # the score under the lowest such cut
        return float((hi + lo) / 2)
    # platt: a logistic fit of the inner-CV combined logit; its 0.5 crossing as a probability
    from scipy.special import expit, logit
    from sklearn.linear_model import LogisticRegression

    z = logit(np.clip(p, 1e-6, 1 - 1e-6))[:, None]
    fit = LogisticRegression(C=1e6).fit(z, y)
    return float(expit(-fit.intercept_[0] / fit.coef_[0, 0]))


def load(spec: str) -> dict[str, np.ndarray]:
    """One run, or several joined by '+' (runs of the same folds by different backbones):
    their member logits side by side, so the weights cover all of them."""
    runs = [np.load(p) for p in spec.split("+")]
    out = {k: runs[0][k] for k in runs[0].files}
    for run in runs[1:]:
        assert np.array_equal(run["folds"], out["folds"]), "runs on different folds"
        for k in run.files:
            if "_logits_" not in k:
                continue
            if 0 in out[k].shape or 0 in run[k].shape:  # a --no-inner run: no inner logits
                out[k] = np.zeros((out[k].shape[0], 0, 0))  # scored at 0.5
                continue
            out[k] = np.concatenate([out[k], run[k]], axis=-1)
    return out


def score(path: str, w: np.ndarray | None, rule: str, views: int = 0) -> tuple[int, int, float]:
    run = load(path)
    if views:  # TTA over the first `views` saved views only
        run = {k: v[:views] if k.startswith("val_logits_") else v for k, v in run.items()}
    members = run["val_logits_0"].shape[-1]
    joined = path.count("+") + 1
    if w is None:  # the shipped weights of each run's layout, shared between joined runs
        w = np.tile(member_weights((members // joined - 1) // 2), joined) / joined
    elif len(w) != members:  # the same weights for each joined run, shared between them
        w = np.tile(w, members // len(w)) / (members // len(w))
    y = run["y"]
    folds = sorted({int(k.rsplit("_", 1)[1]) for k in run if k.startswith("val_rows_")})
    ys, ps, ds, ids = [], [], [], []
    for f in folds:
        va = run[f"val_rows_{f}"]
        p = combine(run[f"val_logits_{f}"], w)
        inner = combine(run[f"inner_logits_{f}"], w) if run[f"inner_logits_{f}"].size else None
        t = (
            0.5
            if inner is None
            else threshold(rule, y[run[f"inner_rows_{f}"]], run[f"inner_logits_{f}"], inner, w)
        )
        ys.append(y[va])
        ps.append(p)
        ds.append((p >= t).astype(int))
        ids.append(va)
    y_all, p_all, d_all, id_all = map(np.concatenate, (ys, ps, ds, ids))
    wrong = id_all[d_all != y_all]
    right = int((d_all == y_all).sum())
    print(
        f"{path}: AUC {roc_auc(y_all, p_all):.4f}, {right}/{len(y_all)} right "
        f"({right / len(y_all):.3f}); wrong rows {wrong.tolist()} "
        f"p {np.round(p_all[d_all != y_all], 2).tolist()} y {y_all[d_all != y_all].tolist()}"
    )
    return right, len(y_all), roc_auc(y_all, p_all)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--weights", help="logit weights (default: the shipped ones)")
    parser.add_argument(
        "--threshold", default="youden", choices=["youden", "youden-mid", "half", "platt"]
    )
    parser.add_argument("--views", type=int, default=0, help="use the first N saved views")
    args = parser.parse_args()
    w = np.array([float(v) for v in args.weights.split(",")]) if args.weights else None
    total = [score(r, w, args.threshold, args.views) for r in args.runs]
    if len(total) > 1:
        k, n = sum(t[0] for t in total), sum(t[1] for t in total)
        print(f"all: {k}/{n} ({k / n:.3f}), mean AUC {np.mean([t[2] for t in total]):.4f}")


if __name__ == "__main__":
    main()
