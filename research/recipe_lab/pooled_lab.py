"""Session-6 lab: the pooled regressions and the density forest trained on both sets.

The MIL heads already train on the main set plus the other set (with a bias per set); the
pooled-feature regressions and the density forest use the main set only (80 RSNA slices
per fold). This refits those two kinds on both sets, with the set as an extra feature,
and swaps their logits into saved cv_members.py runs of the same folds (the MIL logits
stay as saved), printing the three-network ensemble's AUC per fold seed for both.

    .venv/bin/python research/recipe_lab/pooled_lab.py CACHE RUN0 RUN1 RUN2
        (RUNs: the saved 'lite0+lite1+lite2' .npz triples of fold seeds 0, 1, 2)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).parent))
import cv_members
import score_members

from ichscan.evaluate.metrics import roc_auc
from ichscan.models.small_set import clipped_logit, member_weights
from ichscan.train import small_set as ss


def fit_lr(
    pooled: torch.Tensor, rows: np.ndarray, y: np.ndarray, source: np.ndarray
) -> tuple[StandardScaler, LogisticRegression]:
    x = pooled[:, rows].reshape(-1, pooled.shape[2]).numpy()
    x = np.hstack([x, np.tile(source[rows] != 0, ss.N_VIEWS)[:, None].astype(np.float32)])
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=0.01, max_iter=3000).fit(scaler.transform(x), np.tile(y[rows], 8))
    return scaler, lr


def lr_logits(
    model: tuple[StandardScaler, LogisticRegression], pooled: torch.Tensor, rows: np.ndarray
) -> np.ndarray:
    scaler, lr = model
    out = []
    for v in (0, 1):
        x = np.hstack([pooled[v, rows].numpy(), np.zeros((len(rows), 1), np.float32)])
        out.append(lr.decision_function(scaler.transform(x)))
    return np.stack(out)  # [2, N]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("runs", nargs=3)
    args = ap.parse_args()
    backbones = [f"efficientnet_{b}" for b in ("lite0", "lite1", "lite2")]
    data, folds0 = cv_members.load(args.cache, backbones)
    w = np.asarray(member_weights(3))
    for seed, spec in enumerate(args.runs):
        run = score_members.load(spec)  # val logits [2, N, 9]: mil x3, lr x3, forest x3
        folds = cv_members.split(data, folds0, seed)
        ys, base, pooled_p = [], [], []
        for fold in sorted(set(folds[folds >= 0])):
            tr = np.flatnonzero((folds != fold) & ((data.source != 0) | (folds >= 0)))
            va = run[f"val_rows_{fold}"]
            saved = run[f"val_logits_{fold}"]
            shipped = np.concatenate(
                [saved[..., [0, 3, 6]], saved[..., [1, 4, 7]], saved[..., [2]]], -1
            )
            new = shipped.copy()
            for b in range(3):
                model = fit_lr(data.pooled[b], tr, data.y, data.source)
                new[..., 3 + b] = lr_logits(model, data.pooled[b], va)
            dens = np.hstack([data.density, (data.source != 0)[:, None].astype(np.float32)])
            forest = RandomForestClassifier(500, min_samples_leaf=2, random_state=0, n_jobs=1)
            forest.fit(dens[tr], data.y[tr])
            test = np.hstack([data.density[va], np.zeros((len(va), 1), np.float32)])
            p = torch.as_tensor(forest.predict_proba(test)[:, 1])
            new[..., 6] = clipped_logit(p).numpy()[None]
            ys.append(data.y[va])
            base.append(score_members.combine(shipped, w))
            pooled_p.append(score_members.combine(new, w))
        y = np.concatenate(ys)
        print(
            f"seed {seed}: shipped AUC {roc_auc(y, np.concatenate(base)):.4f}, "
            f"both sets {roc_auc(y, np.concatenate(pooled_p)):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
