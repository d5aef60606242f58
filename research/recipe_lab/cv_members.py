"""Session-3 lab harness: the shipped small-set recipe's members, 5-fold CV, per-fold member
logits saved (outer validation fold and the inner-CV out-of-fold logits that choose the
threshold), so combination and threshold questions are answered without refitting.

It calls ichscan.train.small_set's own functions (the same fits `ichscan train` runs), on a
prepared cache made by benchmarks/real_data.py --with-other (main set + the other set as
extra training data, folds in the cache index).

    .venv/bin/python research/recipe_lab/cv_members.py CACHE OUT.npz [--fold-seed S]
        [--variant NAME]

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
    args = parser.parse_args()
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
        main_rows, inner = ss.inner_oof(data, tr, args.seed)
        final = ss.fit_members(data, tr, args.seed)
        result[f"val_rows_{fold}"] = va
        result[f"val_logits_{fold}"] = ss.members_logits(final, data, va)
        result[f"inner_rows_{fold}"] = main_rows
        result[f"inner_logits_{fold}"] = inner
        p = ss.combine(result[f"val_logits_{fold}"])
        print(f"fold {fold}: {time.monotonic() - t0:.0f} s, val p {np.round(p, 2).tolist()}")
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
