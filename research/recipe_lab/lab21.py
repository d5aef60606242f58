"""Session 21 lab: the shipped members on fresh, patient-grouped splits, with candidate pixel
readers beside them, all through the product's own fits (ichscan.train.small_set and
ichscan.train.pixel_reader; cv_members.py predates the pixel reader's brain plane).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/lab21.py prep
    PYTHONPATH=src .venv/bin/python research/recipe_lab/lab21.py members h|s SEED [SEED...]
    PYTHONPATH=src .venv/bin/python research/recipe_lab/lab21.py pixel VARIANT h|s SEED [...]
    PYTHONPATH=src .venv/bin/python research/recipe_lab/lab21.py score h|s SEED [SEED...]

`prep` makes each set's prepared cache exactly as `benchmarks/real_data.py --with-other` does
(near-duplicates grouped into one patient, the other set as extra training data). `members`
fits the shipped members (fit_members: MIL heads, pooled logistics, density forest, blob
forest, pixel reader) on each fold's training rows and saves the validation fold's member
logits, identity and mirror, without the inner CV (the lab scores at 0.5, as sessions 13-19
did). Lab splits are StratifiedGroupKFold over the cache's patient ids (random_state 1000 +
seed): unlike cv_members.py's, a near-duplicate never sits on both sides. `pixel` refits only
the pixel reader with a VARIANT's settings on the same rows and seeds. `score` recombines.

The candidates and the rule are in SESSION21.md, written before any of these splits was
scored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from ichscan.data.cache import PreparedCache
from ichscan.models import small_set as model
from ichscan.models.blobs import batch_blobs
from ichscan.models.pixel_reader import pixel_logit
from ichscan.preprocess.head_crop import CENTRE_SHARE
from ichscan.threads import torch_threads
from ichscan.train import pixel_reader as pr
from ichscan.train import small_set as ss

ROOT = Path("/tmp/s21/lab")
DATA = Path("/work/shared/data")
SETS = {"h": "head_ct", "s": "rsna_png"}
HARD = ["070", "053", "041", "040", "106", "115"]

# Each variant: attributes of ichscan.train.pixel_reader set before its fits.
VARIANTS: dict[str, dict] = {
    "shipped": {},
    "faint": {"RAISE": (30.0, 110.0), "EPOCHS": 16},
    "hull": {},  # reads hull_plane, not the brain plane
}
PLANES = {"hull"}


def hull_mask(region: np.ndarray) -> np.ndarray:
    """bool [H, W]: the convex hull of a region (the region itself when too small)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(region)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):
        return region.copy()
    yy, xx = np.mgrid[: region.shape[0], : region.shape[1]]
    grid = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)], 1)
    return ((grid @ hull.equations.T) <= 0.5).all(1).reshape(region.shape)


def hull_plane(brain: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The head plane inside the convex hull of the brain plane's region: a bleed the brain
    crop cut with the skull (a notch in its outline) is back, the scalp is not."""
    from ichscan.preprocess.head_crop import brain_region

    region = brain_region(brain)
    return np.where(hull_mask(region), head, 0).astype(np.uint8) if region.any() else brain


def prep() -> None:
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from real_data import LABELS_ARG, SAME_PATIENT_R, grouped_view

    from ichscan.train.loop import TrainConfig
    from ichscan.train.data import resolve_training_data

    for tag, name in SETS.items():
        view, groups = grouped_view(DATA / name, ROOT / tag / "grouped", SAME_PATIENT_R)
        other = [str(DATA / o) for o in SETS.values() if o != name]
        config = TrainConfig(
            data=str(view),
            out=str(ROOT / tag / "run"),
            extra_train=tuple(other),
            labels=LABELS_ARG[name],
        )
        data = resolve_training_data(config)
        print(tag, data, groups["note"])


def cache_of(tag: str) -> PreparedCache:
    return PreparedCache(ROOT / tag / "run" / "cache")


def features(tag: str) -> tuple[ss.TrainingFeatures, np.ndarray, np.ndarray, np.ndarray]:
    """The product's TrainingFeatures of every labelled row, the rows' patient ids (main set)
    and image ids, and the cache's own folds."""
    cache = cache_of(tag)
    labels = cache.labels()[:, 0]
    rows = np.flatnonzero(cache.ok & (labels >= 0))
    # As train_small_set reads them: the brain plane, the head plane, the centre zoom.
    planes = np.stack([np.asarray(cache[int(r)]).transpose(2, 0, 1)[:2] for r in rows])
    greys = {
        c: np.ascontiguousarray(planes[:, i])
        for c, i in model.CROP_PLANES.items()
        if i < len(planes[0])
    }
    brain = greys["brain"]
    readers = model.readers_for(cache.crop)
    density, centre, blobs = model.side_arrays(
        brain, CENTRE_SHARE if model.reads_centre(readers) else None, blobs=True
    )
    if centre is not None:
        greys[model.CENTRE_READER.crop] = centre[:, 0]
    mirror = batch_blobs(np.ascontiguousarray(brain[..., ::-1]))
    source, names = ss.source_ids(cache)
    extractors = {b: model.LiteMaps(b) for b in dict.fromkeys(r.backbone for r in readers)}
    maps = []
    for reader in readers:
        m, _ = ss.FeatureMaps.compute(
            greys[reader.crop],
            ss.default_feature_cache(),
            extractors[reader.backbone],
            False,
            crop=reader.crop,
        )
        maps.append(m)
    data = ss.TrainingFeatures(
        maps,
        [ss.pooled_views(m) for m in maps],
        density,
        np.stack([blobs, mirror]),
        labels[rows].astype(np.int64),
        source[rows],
        len(names),
        brain,
    )
    index = cache.index.iloc[rows]
    patients = index["patient_id"].astype(str).to_numpy()
    ids = index["image_id"].astype(str).to_numpy()
    return data, patients, ids, index["fold"].to_numpy()


def lab_folds(data: ss.TrainingFeatures, patients: np.ndarray, seed: int) -> np.ndarray:
    """-2 for extra-set rows (always training), else the main set's fold 0..4."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.full(len(data.y), -2)
    main = np.flatnonzero(data.source == 0)
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=1000 + seed)
    for i, (_, held) in enumerate(cv.split(main, data.y[main], patients[main])):
        out[main[held]] = i
    return out


def fold_rows(folds: np.ndarray, fold: int, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tr = np.flatnonzero((folds != fold) & ((source != 0) | (folds >= 0)))
    return tr, np.flatnonzero(folds == fold)


def members(tag: str, seeds: list[int]) -> None:
    data, patients, ids, _ = features(tag)
    for seed in seeds:
        out = ROOT / f"{tag}_members_s{seed}.npz"
        if out.exists():
            continue
        folds = lab_folds(data, patients, seed)
        saved: dict[str, np.ndarray] = {"y": data.y, "ids": ids, "folds": folds}
        for fold in range(5):
            t0 = time.monotonic()
            tr, va = fold_rows(folds, fold, data.source)
            with torch_threads(1):
                fitted = ss.fit_members(data, tr, seed * 10 + fold)
            saved[f"val_{fold}"] = va
            saved[f"logits_{fold}"] = ss.members_logits(fitted, data, va)
            p = ss.combine(saved[f"logits_{fold}"])
            right = int(((p >= 0.5) == data.y[va]).sum())
            print(f"{tag} s{seed} f{fold}: {time.monotonic() - t0:.0f} s, {right}/{len(va)}")
        np.savez(out, **saved)


@torch.no_grad()
def pixel_views(net: torch.nn.Module, brain: np.ndarray) -> np.ndarray:
    """[2, N] the reader's logits of the identity and the mirror, as members_logits gives."""
    grey = torch.from_numpy(brain).float() / 255.0
    return np.stack([pixel_logit(net, grey).numpy(), pixel_logit(net, grey.flip(-1)).numpy()])


def pixel(variant: str, tag: str, seeds: list[int]) -> None:
    for key, value in VARIANTS[variant].items():
        setattr(pr, key, value)
    cache = cache_of(tag)
    labels = cache.labels()[:, 0]
    rows = np.flatnonzero(cache.ok & (labels >= 0))
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    if variant in PLANES:
        t0 = time.monotonic()
        heads = [np.asarray(cache[int(r)])[..., 1] for r in rows]
        brain = np.stack([hull_plane(b, h) for b, h in zip(brain, heads, strict=True)])
        print(f"{variant} planes: {time.monotonic() - t0:.1f} s for {len(rows)} slices")
    y = labels[rows].astype(np.int64)
    for seed in seeds:
        out = ROOT / f"{tag}_pixel_{variant}_s{seed}.npz"
        ref = np.load(ROOT / f"{tag}_members_s{seed}.npz")
        if out.exists():
            continue
        folds, source = ref["folds"], np.where(ref["folds"] == -2, 1, 0)
        saved = {}
        for fold in range(5):
            t0 = time.monotonic()
            tr, va = fold_rows(folds, fold, source)
            assert np.array_equal(va, ref[f"val_{fold}"])
            net = pr.fit_pixel_reader(brain, y, tr, seed * 10 + fold, {}, epochs=pr.EPOCHS)
            saved[f"pixel_{fold}"] = pixel_views(net, brain[va])
            print(f"{tag} {variant} s{seed} f{fold}: {time.monotonic() - t0:.0f} s", flush=True)
        np.savez(out, **saved)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def score(tag: str, seeds: list[int]) -> None:
    weights = (0.5, 0.75, 1.0)
    variants = [v for v in VARIANTS if v != "shipped"]
    for seed in seeds:
        # the image ids were saved as an object array (lab-written files only)
        ref = np.load(ROOT / f"{tag}_members_s{seed}.npz", allow_pickle=True)
        y, ids = ref["y"], ref["ids"]
        columns: dict[str, list[np.ndarray]] = {}
        rows = []
        for fold in range(5):
            logits = ref[f"logits_{fold}"]
            rows.append(ref[f"val_{fold}"])
            cands = {"shipped": logits}
            for v in variants:
                path = ROOT / f"{tag}_pixel_{v}_s{seed}.npz"
                if path.exists():
                    swapped = logits.copy()
                    swapped[..., -1] = np.load(path)[f"pixel_{fold}"]
                    cands[v] = swapped
            for name, lg in cands.items():
                for w in weights:
                    model.PIXEL_WEIGHT = w
                    columns.setdefault(f"{name} w{w}", []).append(ss.combine(lg))
                columns.setdefault(f"{name} alone", []).append(
                    1 / (1 + np.exp(-lg[..., -1].mean(0)))
                )
        model.PIXEL_WEIGHT = 0.5
        r = np.concatenate(rows)
        for name, parts in columns.items():
            p = np.concatenate(parts)
            right = int(((p >= 0.5) == y[r]).sum())
            hard = {ids[i]: q for i, q in zip(r, p, strict=True)}
            shown = " ".join(f"{h}:{hard[h]:.2f}" for h in HARD if h in hard)
            print(f"{tag} s{seed} {name:16s} AUC {roc_auc(y[r], p):.4f} right {right}  {shown}")


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "prep":
        prep()
    elif command == "members":
        members(rest[0], [int(s) for s in rest[1:]])
    elif command == "pixel":
        pixel(rest[0], rest[1], [int(s) for s in rest[2:]])
    else:
        score(rest[0], [int(s) for s in rest[1:]])
