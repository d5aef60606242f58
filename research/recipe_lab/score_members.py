"""Score saved per-fold member logits (cv_members.py) under a combination rule and a
threshold rule: pooled AUC, accuracy at each fold's own inner-CV threshold, the errors.

    .venv/bin/python research/recipe_lab/score_members.py RUN.npz [RUN2.npz ...]
        [--weights 0.5,0.25,0.25] [--threshold youden|half]
"""

from __future__ import annotations

import argparse

import numpy as np

from ichscan.evaluate.metrics import roc_auc, youden_threshold


def combine(logits: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = logits @ w
    return (1.0 / (1.0 + np.exp(-z))).mean(axis=0)


def threshold(rule: str, y: np.ndarray, logits: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    if rule == "half":
        return 0.5
    if rule == "youden":
        return youden_threshold(y, p)
    # platt: a logistic fit of the inner-CV combined logit; its 0.5 crossing as a probability
    from scipy.special import expit, logit
    from sklearn.linear_model import LogisticRegression

    z = logit(np.clip(p, 1e-6, 1 - 1e-6))[:, None]
    fit = LogisticRegression(C=1e6).fit(z, y)
    return float(expit(-fit.intercept_[0] / fit.coef_[0, 0]))


def score(path: str, w: np.ndarray, rule: str) -> tuple[int, int, float]:
    run = np.load(path)
    y = run["y"]
    folds = sorted({int(k.rsplit("_", 1)[1]) for k in run.files if k.startswith("val_rows_")})
    ys, ps, ds, ids = [], [], [], []
    for f in folds:
        va = run[f"val_rows_{f}"]
        p = combine(run[f"val_logits_{f}"], w)
        inner = combine(run[f"inner_logits_{f}"], w)
        t = threshold(rule, y[run[f"inner_rows_{f}"]], run[f"inner_logits_{f}"], inner, w)
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
    parser.add_argument("--weights", default="0.5,0.25,0.25")
    parser.add_argument("--threshold", default="youden", choices=["youden", "half", "platt"])
    args = parser.parse_args()
    w = np.array([float(v) for v in args.weights.split(",")])
    total = [score(r, w, args.threshold) for r in args.runs]
    if len(total) > 1:
        k, n = sum(t[0] for t in total), sum(t[1] for t in total)
        print(f"all: {k}/{n} ({k / n:.3f}), mean AUC {np.mean([t[2] for t in total]):.4f}")


if __name__ == "__main__":
    main()
