"""Session-6 lab: does a left-right comparison help the MIL head?

A bleed is nearly always on one side; the brain, its calcifications and the skull base are
nearly symmetric. Views 0 and 1 of every cached slice are the slice and its mirror, so
``map(x) - map(mirror(x))`` (no flip of the maps) is zero for a symmetric head and carries
only what differs between the sides. This trains the MIL head on views 0/1 with either the
map alone (baseline, two views) or the map and that difference as channels, and prints the
head's out-of-fold AUC per fold seed.

    .venv/bin/python research/recipe_lab/asym_lab.py CACHE [--fold-seeds 0,1,2]
        [--backbone lite0] [--variant base,asym]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
import cv_members

from ichscan.models.small_set import MILHead
from ichscan.train import small_set as ss


def paired(
    maps: ss.FeatureMaps, rows: np.ndarray, views: np.ndarray, asym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    fine, deep = maps.take(rows, views)
    if not asym:
        return fine, deep
    of, od = maps.take(rows, 1 - views)
    return torch.cat([fine, fine - of], 1), torch.cat([deep, deep - od], 1)


def fit(
    maps: ss.FeatureMaps,
    rows: np.ndarray,
    y: np.ndarray,
    source: np.ndarray,
    sources: int,
    seed: int,
    asym: bool,
    epochs: int = 30,
) -> MILHead:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    src_def = maps.source
    if asym:
        src_def = replace(
            src_def,
            fine_channels=2 * src_def.fine_channels,
            deep_channels=2 * src_def.deep_channels,
        )
    head = MILHead(src_def, sources)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    bs = 32
    steps = epochs * -(-len(rows) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    target = torch.as_tensor(y[rows], dtype=torch.float32) * 0.9 + 0.05
    src = torch.as_tensor(source[rows])
    head.train()
    for _ in range(epochs):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), bs):
            pick = order[start : start + bs]
            f, d = paired(maps, rows[pick], rng.integers(0, 2, len(pick)), asym)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                head(f, d, src[pick]), target[pick]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def score(head: MILHead, maps: ss.FeatureMaps, rows: np.ndarray, asym: bool) -> np.ndarray:
    src = torch.zeros(len(rows), dtype=torch.long)
    p = []
    for v in (0, 1):
        f, d = paired(maps, rows, np.full(len(rows), v), asym)
        p.append(torch.sigmoid(head(f, d, src)).numpy())
    return np.mean(p, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--fold-seeds", default="0,1,2")
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--variant", default="base,asym")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data, folds0 = cv_members.load(args.cache, [f"efficientnet_{args.backbone}"])
    maps = data.maps[0]
    for fs in map(int, args.fold_seeds.split(",")):
        folds = cv_members.split(data, folds0, fs)
        for variant in args.variant.split(","):
            t0 = time.monotonic()
            p = np.full(len(folds), np.nan)
            for fold in sorted(set(folds[folds >= 0])):
                tr = np.flatnonzero((folds != fold) & ((data.source != 0) | (folds >= 0)))
                va = np.flatnonzero(folds == fold)
                head = fit(maps, tr, data.y, data.source, data.sources, 0, variant == "asym")
                p[va] = score(head, maps, va, variant == "asym")
            m = folds >= 0
            auc = roc_auc_score(data.y[m], p[m])
            acc = ((p[m] > 0.5) == data.y[m]).mean()
            print(
                f"seed {fs} {variant}: AUC {auc:.4f} acc@0.5 {acc:.3f} "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
