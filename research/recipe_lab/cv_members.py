"""Session-3 lab harness: the shipped small-set recipe's members, 5-fold CV, per-fold member
logits saved (outer validation fold and the inner-CV out-of-fold logits that choose the
threshold), so combination and threshold questions are answered without refitting.

It calls ichscan.train.small_set's own functions (the same fits `ichscan train` runs), on a
prepared cache made by benchmarks/real_data.py --with-other (main set + the other set as
extra training data, folds in the cache index).

    .venv/bin/python research/recipe_lab/cv_members.py CACHE OUT.npz [--fold-seed S]
        [--net-size N] [--backbone lite0|lite1|lite2]

--fold-seed 0 reuses the cache's folds (those of the benchmark); other seeds re-split the
main set's slices 5-fold stratified, so a change can be checked on fresh splits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ichscan.data.cache import PreparedCache
from ichscan.models.density import density_features
from ichscan.models.small_set import LiteMaps
from ichscan.train import small_set as ss


# name → (blocks giving the 16x16 and the 8x8 maps, their channels): the stage ends of each
# Lite variant at stride 16 and at the last 8x8 stage before the 320-channel block
BACKBONES = {
    "lite0": (10, 14, 112, 192),
    "lite1": (14, 19, 112, 192),
    "lite2": (14, 19, 120, 208),
}


def use_backbone(name: str) -> None:
    """Point the shipped model code at another Lite variant (lab only: module constants)."""
    import ichscan.models.small_set as model

    fine_block, deep_block, fine_ch, deep_ch = BACKBONES[name]
    model.BACKBONE = f"efficientnet_{name}"
    model.MAP_BLOCK, model.DEEP_BLOCK = fine_block, deep_block
    model.FINE_CHANNELS, model.DEEP_CHANNELS = fine_ch, deep_ch + 1280
    ss.FEATURE_VERSION = f"{name}-b{fine_block}-b{deep_block}-head-256-v1"


def load(cache_dir: str) -> tuple[ss.TrainingFeatures, np.ndarray]:
    cache = PreparedCache(cache_dir)
    rows = np.flatnonzero(cache.ok)
    greys = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    y = cache.labels()[rows, 0].astype(np.int64)
    source, names = ss.source_ids(cache)
    maps, computed = ss.FeatureMaps.compute(
        greys, ss.default_feature_cache(), LiteMaps("imagenet"), progress=False
    )
    print(f"{len(rows)} slices, {computed} maps computed, sources {names}")
    data = ss.TrainingFeatures(
        maps,
        ss.pooled_views(maps),
        np.stack([density_features(g) for g in greys]),
        y,
        source[rows],
        len(names),
    )
    folds = cache.index["fold"].to_numpy()[rows]
    return data, folds


def view_logits(
    members: ss.Members, data: ss.TrainingFeatures, rows: np.ndarray, views: int
) -> np.ndarray:
    """[views, N, 3] member logits of ``rows`` in the first ``views`` cached views (2: what
    the predictor does, identity and mirror; 8: all the cached augmentations as TTA)."""
    import torch

    from ichscan.models.small_set import member_logits

    if views == 2:
        return ss.members_logits(members, data, rows)
    density = torch.from_numpy(data.density[rows])
    source = torch.zeros(len(rows), dtype=torch.long)
    out = []
    with torch.no_grad():
        for v in range(views):
            fine, deep = data.maps.take(rows, v)
            out.append(
                member_logits(
                    members.mil, members.logistic, members.forest, fine, deep, density, source
                ).numpy()
            )
    return np.stack(out)


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
    parser.add_argument("--views", type=int, default=2, help="validation views saved (2 or 8)")
    parser.add_argument(
        "--backbone", choices=sorted(BACKBONES), default="lite0", help="frozen feature network"
    )
    args = parser.parse_args()
    if args.backbone != "lite0":
        use_backbone(args.backbone)
    if args.net_size:
        import ichscan.models.small_set as model

        model.NET_SIZE = args.net_size
        ss.FEATURE_VERSION += f"-net{args.net_size}"
    data, folds = load(args.cache)
    folds = split(data, folds, args.fold_seed)
    result: dict[str, np.ndarray] = {"y": data.y, "folds": folds, "source": data.source}
    for fold in sorted(set(folds[folds >= 0])):
        t0 = time.monotonic()
        tr = np.flatnonzero((folds != fold) & ((data.source != 0) | (folds >= 0)))
        va = np.flatnonzero(folds == fold)
        if args.no_inner:
            main_rows, inner = tr[data.source[tr] == 0], np.zeros((2, 0, 3))
        else:
            main_rows, inner = ss.inner_oof(data, tr, args.seed)
        final = ss.fit_members(data, tr, args.seed)
        result[f"val_rows_{fold}"] = va
        result[f"val_logits_{fold}"] = view_logits(final, data, va, args.views)
        result[f"inner_rows_{fold}"] = main_rows
        result[f"inner_logits_{fold}"] = inner
        p = ss.combine(result[f"val_logits_{fold}"])
        print(f"fold {fold}: {time.monotonic() - t0:.0f} s, val p {np.round(p, 2).tolist()}")
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
