"""Session 11: blood against calcium in the density forest. Fresh blood is 50–90 HU,
calcification (pineal, choroid plexus, basal ganglia) well above 100: in a brain window the
one is a bright blob, the other a saturated core with a partial-volume rim as bright as
blood. The shipped blob features count both. The variant adds the same blob features on a
"blood range" mask: bright (median + 50 or more), below saturation (245), and more than two
pixels away from any saturated pixel.

Refits the forest per fold on saved `cv_members.py --no-inner` runs (same cache and fold
seed: the three brain readers, then the head reader and the centre reader if given) with the
29 shipped features and with the 29 + 5 variant, puts its logit in place of the run's forest,
and scores the readers' weighted sum (pooled AUC, right at 0.5).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/density_lab.py CACHE \
        BRAIN.npz+HEAD.npz[+ZOOM.npz] [...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.special import expit
from zoom_rules import fold_parts, weighted_sum

from ichscan.data.cache import PreparedCache
from ichscan.evaluate.metrics import roc_auc
from ichscan.models.density import _blob_features, density_features, inner_brain
from ichscan.models.small_set import clipped_logit
from ichscan.train.small_set import fit_forest

SATURATED = 245


def blood_blob_features(grey: np.ndarray) -> list[float]:
    inner = inner_brain(grey)
    if inner is None:
        return [0.0] * 5
    g = np.asarray(grey, dtype=np.float32)
    med = float(np.median(g[inner]))
    calcium = ndi.binary_dilation(g >= SATURATED, iterations=2)
    return _blob_features(np.where(calcium, 0, g), inner, med, 50)


def main() -> None:
    cache = PreparedCache(sys.argv[1])
    rows = np.flatnonzero(cache.ok)
    greys = [np.asarray(cache[int(r)])[..., 0] for r in rows]
    shipped = np.stack([density_features(g) for g in greys])
    variant = np.concatenate([shipped, np.array([blood_blob_features(g) for g in greys])], 1)
    for group in sys.argv[2:]:
        runs = [np.load(p) for p in group.split("+")]
        y, folds, source = runs[0]["y"], runs[0]["folds"], runs[0]["source"]
        scores: dict[str, list[np.ndarray]] = {"run": [], "29": [], "34": []}
        ys, ids = [], []
        for va, y_va, readers, forest in fold_parts(runs):
            f = int(folds[va[0]])
            tr = np.flatnonzero((folds != f) & (folds >= 0) & (source == 0))
            scores["run"].append(expit(weighted_sum(readers, forest)).mean(0))
            for name, feats in (("29", shipped), ("34", variant)):
                refit = fit_forest(feats, tr, y, 0)
                z = clipped_logit(refit(torch.from_numpy(feats[va]))).numpy()
                z = np.broadcast_to(z[None, :, None], forest.shape)
                scores[name].append(expit(weighted_sum(readers, z)).mean(0))
            ys.append(y_va)
            ids += cache.index["image_id"].to_numpy()[rows[va]].astype(str).tolist()
        yy = np.concatenate(ys)
        line = []
        for k, v in scores.items():
            p = np.concatenate(v)
            line.append(f"{k}: AUC {roc_auc(yy, p):.4f} right {int(((p >= 0.5) == yy).sum())}")
        print(group.split("+")[0].rsplit("/", 1)[-1], "  ".join(line))
        p29, p34 = np.concatenate(scores["29"]), np.concatenate(scores["34"])
        wrong = [
            (i, round(float(a), 2), round(float(b), 2))
            for i, a, b, t in zip(ids, p29, p34, yy, strict=True)
            if (a >= 0.5) != t or (b >= 0.5) != t
        ]
        print("   wrong (id, 29, 34):", wrong)


if __name__ == "__main__":
    main()
