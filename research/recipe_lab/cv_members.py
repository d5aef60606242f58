"""STALE since session 19: this harness predates the pixel reader and the brain plane in
TrainingFeatures, and its splits do not group near-duplicates; lab21.py fits the shipped
members through the product's functions on grouped splits. Kept for the earlier sessions'
records.

Session-3 lab harness: the shipped small-set recipe's members, 5-fold CV, per-fold member
logits saved (outer validation fold and the inner-CV out-of-fold logits that choose the
threshold), so combination and threshold questions are answered without refitting.

It calls ichscan.train.small_set's own functions (the same fits `ichscan train` runs), on a
prepared cache made by benchmarks/real_data.py --with-other (main set + the other set as
extra training data, folds in the cache index).

    .venv/bin/python research/recipe_lab/cv_members.py CACHE OUT.npz [--fold-seed S]
        [--net-size N] [--backbones lite0,lite1,lite2] [--views 8] [--no-inner] [--windows]
        [--crop head] [--train-views 16] [--use-views 4] [--heads 3]

--crop head re-reads every slice from its source file with the head crop (skull and scalp
kept) instead of the cache's brain crop, same rows and folds. --train-views N caches and
trains on N views per slice instead of 8 (the first 8 are the shipped ones); --use-views N
trains on the first N of the cached 8 (identity, mirror, N - 2 augmented).

--heads N averages N MIL heads from different seeds per network (session 9).

--fold-seed 0 reuses the cache's folds (those of the benchmark); other seeds re-split the
main set's slices 5-fold stratified, so a change can be checked on fresh splits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ichscan.data.cache import PreparedCache
from ichscan.models import small_set as model
from ichscan.models.blobs import batch_blobs
from ichscan.models.density import batch_density
from ichscan.models.small_set import LiteMaps
from ichscan.train import small_set as ss


class WindowedLiteMaps(LiteMaps):
    """The brain-window grey as three channels: itself, a narrow 20–60 HU window and a 40–80
    HU 'blood' window, both stretched from the 0–80 HU grey (windows as channels, from a
    brain-window image)."""

    @torch.no_grad()
    def forward(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        narrow = ((grey - 0.25) / 0.5).clamp(0, 1)
        blood = ((grey - 0.5) / 0.5).clamp(0, 1)
        return super().forward(torch.cat([grey, narrow, blood], dim=1))


ZOOM = 0.6


def zoom_centre(grey: np.ndarray) -> np.ndarray:
    """Session 11: the middle of the brain (basal ganglia, thalami, ventricles), a square of
    ZOOM times the brain's extent around its centre, resized back to the crop's size, so
    the network reads a small deep bleed at 1/ZOOM times the scale. A blank slice stays
    blank."""
    from PIL import Image

    from ichscan.preprocess.head_crop import brain_region

    brain = brain_region(grey)
    if brain.sum() < 50:
        return np.zeros_like(grey)
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    cy, cx = (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2
    half = max(ZOOM * max(rows[-1] - rows[0], cols[-1] - cols[0]) / 2, 16)
    box = (cx - half, cy - half, cx + half, cy + half)
    size = grey.shape[::-1]
    return np.asarray(
        Image.fromarray(grey).transform(
            size, Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
        )
    )


def load(
    cache_dir: str, backbones: list[str], windows: bool = False, crop: str = "brain"
) -> tuple[ss.TrainingFeatures, np.ndarray]:
    cache = PreparedCache(cache_dir)
    rows = np.flatnonzero(cache.ok)
    if crop == "brain":
        greys = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    elif crop == "zoom":
        greys = np.stack([zoom_centre(np.asarray(cache[int(r)])[..., 0]) for r in rows])
    else:
        from ichscan.data.prepare import read_row

        greys = np.stack(
            [
                read_row(cache.index.iloc[int(r)], "brain", cache.size, crop=crop)[..., 0]
                for r in rows
            ]
        )
    y = cache.labels()[rows, 0].astype(np.int64)
    source, names = ss.source_ids(cache)
    maps = []
    for backbone in backbones:
        m, computed = ss.FeatureMaps.compute(
            greys,
            ss.default_feature_cache(),
            (WindowedLiteMaps if windows else LiteMaps)(backbone),
            progress=False,
        )
        maps.append(m)
        print(f"{backbone}: {len(rows)} slices, {computed} maps computed, sources {names}")
    # The blob forest reads the brain crop whatever the readers read (as the product does).
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    data = ss.TrainingFeatures(
        maps,
        [ss.pooled_views(m) for m in maps],
        batch_density(greys),
        np.stack([batch_blobs(brain), batch_blobs(np.ascontiguousarray(brain[..., ::-1]))]),
        y,
        source[rows],
        len(names),
    )
    folds = cache.index["fold"].to_numpy()[rows]
    return data, folds


def split(data: ss.TrainingFeatures, folds: np.ndarray, seed: int, k: int = 5) -> np.ndarray:
    if seed == 0:
        return folds
    from sklearn.model_selection import StratifiedKFold

    out = np.full(len(folds), -2)
    main = np.flatnonzero(data.source == 0)
    for i, (_, held) in enumerate(
        StratifiedKFold(k, shuffle=True, random_state=1000 + seed).split(main, data.y[main])
    ):
        out[main[held]] = i
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out")
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--net-size", type=int, default=0, help="backbone input (default 256)")
    parser.add_argument(
        "--no-inner", action="store_true", help="skip the inner CV (score with --threshold half)"
    )
    parser.add_argument(
        "--views",
        type=int,
        default=2,
        choices=[2],
        help="validation views saved: identity and mirror (8 until session 11; the blob "
        "tables exist for these two)",
    )
    parser.add_argument(
        "--backbones",
        default=",".join(b.removeprefix("efficientnet_") for b in model.BACKBONES),
        help="frozen feature networks, comma-separated: lite0, lite1, lite2 (default: shipped)",
    )
    parser.add_argument(
        "--windows", action="store_true", help="grey + 20–60 HU + 40–80 HU channels"
    )
    parser.add_argument("--crop", default="brain", choices=["brain", "head", "zoom"])
    parser.add_argument("--train-views", type=int, default=ss.N_VIEWS)
    parser.add_argument("--use-views", type=int, default=0)
    parser.add_argument("--heads", type=int, default=ss.MIL_HEADS)
    args = parser.parse_args()
    backbones = [f"efficientnet_{b}" for b in args.backbones.split(",")]
    if args.net_size:
        model.NET_SIZE = args.net_size
        for b in backbones:
            ss.FEATURE_VERSIONS[b] += f"-net{args.net_size}"
    if args.windows:
        for b in backbones:
            ss.FEATURE_VERSIONS[b] += "-windows"
    if args.train_views != ss.N_VIEWS:
        ss.N_VIEWS = args.train_views
        for b in backbones:
            ss.FEATURE_VERSIONS[b] += f"-views{args.train_views}"
    if args.crop != "brain":
        for b in backbones:
            ss.FEATURE_VERSIONS[b] += f"-{args.crop}crop"
    data, folds = load(args.cache, backbones, args.windows, args.crop)
    folds = split(data, folds, args.fold_seed)
    if args.use_views:  # the maps keep all views; the fits read the first N
        ss.N_VIEWS = args.use_views
        data.pooled = [p[: args.use_views] for p in data.pooled]
    settings = ss.MILSettings(heads=args.heads)
    result: dict[str, np.ndarray] = {"y": data.y, "folds": folds, "source": data.source}
    for fold in sorted(set(folds[folds >= 0])):
        t0 = time.monotonic()
        tr = np.flatnonzero((folds != fold) & ((data.source != 0) | (folds >= 0)))
        va = np.flatnonzero(folds == fold)
        if args.no_inner:
            main_rows = tr[data.source[tr] == 0]
            inner = np.zeros((2, 0, 2 * len(backbones) + 2))
        else:
            main_rows, inner = ss.inner_oof(data, tr, args.seed, settings=settings)
        final = ss.fit_members(data, tr, args.seed, settings)
        result[f"val_rows_{fold}"] = va
        result[f"val_logits_{fold}"] = ss.members_logits(final, data, va, range(args.views))
        result[f"inner_rows_{fold}"] = main_rows
        result[f"inner_logits_{fold}"] = inner
        p = ss.combine(result[f"val_logits_{fold}"])
        print(f"fold {fold}: {time.monotonic() - t0:.0f} s, val p {np.round(p, 2).tolist()}")
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
