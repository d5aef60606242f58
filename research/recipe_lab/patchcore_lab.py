"""Session 18: a PatchCore-style member (Roth et al. 2022), scored alone before any ensemble.

Each brain cell of a slice's frozen Lite0 maps (block 10, 112 ch at 16x16, with block 14's
192 ch upsampled beside it, a 3x3 local mean as PatchCore aggregates) is compared with a bank
of the cells of every negative training slice of the fold (both sets, identity and mirror
views). The slice's score is its largest nearest-neighbour distance over its brain cells
(cells at least ``share`` inside the brain crop). It needs no labelled blood, so it might
rank the small bleeds the MIL heads miss (070, 053, 041) otherwise.

    PYTHONPATH=src .venv/bin/python research/recipe_lab/patchcore_lab.py h|s SEEDS \\
        [share=0.5] [agg=3] [deep_ch=192] [std=0|1]

Reads the benchmark's prepared caches (CACHES) and the shipped feature-map cache. Result
(SESSION18.md): it ranks those bleeds no better, and the skull-base negatives as the most
unusual slices.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cv_members import split

from ichscan.data.cache import PreparedCache
from ichscan.evaluate.metrics import roc_auc
from ichscan.models.small_set import LiteMaps
from ichscan.train import small_set as ss

CACHES = {
    "h": "/tmp/s11/bench/h0/head_ct/fold-0/cache",
    "s": "/tmp/s11/bench/s0/rsna_png/fold-0/cache",
}
HARD = ("070", "053", "041", "092", "106", "115", "162", "113")


def load(tag: str):
    cache = PreparedCache(CACHES[tag])
    rows = np.flatnonzero(cache.ok)
    greys = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    maps, _ = ss.FeatureMaps.compute(
        greys, ss.default_feature_cache(), LiteMaps("efficientnet_lite0"), progress=False
    )
    y = cache.labels()[rows, 0].astype(np.int64)
    source, _ = ss.source_ids(cache)
    folds = cache.index["fold"].to_numpy()[rows]
    ids = cache.index["image_id"].astype(str).to_numpy()[rows]
    return greys, maps, y, source[rows], folds, ids


def cell_features(maps: ss.FeatureMaps, view: int, deep_ch: int, agg: int) -> torch.Tensor:
    """[N, C, 16, 16]: block 10 and the first deep_ch channels of the deep map, upsampled."""
    fine = maps.fine[view].float()
    parts = [fine]
    if deep_ch:
        deep = maps.deep[view][:, :deep_ch].float()
        parts.append(F.interpolate(deep, size=fine.shape[-2:], mode="bilinear"))
    x = torch.cat(parts, 1)
    return F.avg_pool2d(x, agg, 1, agg // 2) if agg > 1 else x


def cell_masks(greys: np.ndarray, view: int, share: float) -> torch.Tensor:
    """[N, 16, 16] bool: cells at least ``share`` inside the brain crop (mirrored for view 1)."""
    inside = torch.from_numpy(greys > 0).float()[:, None]
    if view == 1:
        inside = inside.flip(-1)
    return F.adaptive_avg_pool2d(inside, 16)[:, 0] >= share


def slice_scores(feats, masks, rows, bank, owner, mu, sd, exclude_self=False) -> np.ndarray:
    """[2, len(rows)]: the largest nearest-neighbour distance over each slice's brain cells."""
    out = np.zeros((2, len(rows)))
    for v in (0, 1):
        for j, r in enumerate(rows):
            m = masks[v][r]
            if not m.any():
                continue
            dist = torch.cdist((feats[v][r].permute(1, 2, 0)[m] - mu) / sd, bank)
            if exclude_self:
                dist[:, owner == r] = float("inf")
            out[v, j] = dist.min(1).values.max().item()
    return out


def run(tag: str, seeds: list[int], share=0.5, agg=3, deep_ch=192, std=False) -> None:
    greys, maps, y, source, folds0, ids = load(tag)
    feats = [cell_features(maps, v, deep_ch, agg) for v in (0, 1)]
    masks = [cell_masks(greys, v, share) for v in (0, 1)]
    main = np.flatnonzero(source == 0)
    for seed in seeds:
        holder = type("Data", (), {"source": source, "y": y})
        folds = split(holder, folds0, seed)
        scores = np.zeros((2, len(y)))
        for fold in sorted(set(folds[folds >= 0])):
            t0 = time.monotonic()
            tr = np.flatnonzero((folds != fold) & ((source != 0) | (folds >= 0)))
            neg = tr[y[tr] == 0]
            bank, owner = [], []
            for v in (0, 1):
                m = masks[v][neg]
                bank.append(feats[v][neg].permute(0, 2, 3, 1)[m])
                owner.append(torch.from_numpy(neg)[:, None, None].expand(m.shape)[m])
            bank_t = torch.cat(bank)
            mu, sd = (bank_t.mean(0), bank_t.std(0) + 1e-3) if std else (0.0, 1.0)
            va = np.flatnonzero(folds == fold)
            scores[:, va] = slice_scores(
                feats, masks, va, (bank_t - mu) / sd, torch.cat(owner), mu, sd
            )
            print(f"  fold {fold}: {time.monotonic() - t0:.0f} s, bank {len(bank_t)} cells")
        s = scores.mean(0)
        print(f"{tag} seed {seed}: AUC alone {roc_auc(y[main], s[main]):.4f}")
        order = main[np.argsort(-s[main])]
        for name in HARD:
            k = np.flatnonzero((ids == name) & (source == 0))
            if k.size:
                rank = int(np.flatnonzero(order == k[0])[0])
                print(f"   {name} y={y[k[0]]} score {s[k[0]]:.1f} rank {rank} of {main.size}")


if __name__ == "__main__":
    options = dict(a.split("=") for a in sys.argv[3:])
    run(
        sys.argv[1],
        [int(s) for s in sys.argv[2].split(",")],
        share=float(options.get("share", 0.5)),
        agg=int(options.get("agg", 3)),
        deep_ch=int(options.get("deep_ch", 192)),
        std=options.get("std", "0") == "1",
    )
