"""Session 17: synthetic bleeds for the readers' MIL heads (SESSION17.md has the rule).

Each negative slice of the run (both sets) lends one copy with one `synth_lab.insert_bleed`
ellipse (the same fixed seed per slice as session 15's blob-forest candidate), labelled
positive. The copies are read by the brain-crop readers (Lite0/1/2) or by the centre reader
(Lite0 on the centre zoom of the copy) in the product's eight views, and join the MIL head's
training rows of every fold whose training slices hold their original (a copy of a
validation slice never trains). Only the MIL heads change: the pooled regressions, the
density forest and the blob forest keep their shipped out-of-fold logits, and so does the
head reader (its crop is read from the source files, where no copy exists).

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/synth_mil.py \
        dump CACHE OUT.npz --crop brain|zoom --fold-seed S [--control]
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/synth_mil.py \
        score BRAIN.npz+HEAD.npz+ZOOM.npz:CAND_BRAIN.npz+CAND_ZOOM.npz [...]

``--control`` fits without the copies: its logits must equal the shipped run's MIL columns
(the harness check).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
from cv_members import split, zoom_centre
from scipy import ndimage as ndi
from scipy.special import expit
from synth_lab import ellipse_distance, insert_bleed
from vote_rules import blob_path, print_totals, shipped, tally
from zoom_rules import fold_parts

from ichscan.data.cache import PreparedCache
from ichscan.preprocess.head_crop import brain_region
from ichscan.models import small_set as model
from ichscan.models.small_set import LiteMaps
from ichscan.train import small_set as ss


def copies(brain: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [M, H, W] brain crops with one synthetic bleed, the slice each came from)."""
    made, origin = [], []
    for i in np.flatnonzero(y == 0):
        out = insert_bleed(brain[i], np.random.default_rng(1000 + int(i)))
        if out is not None:
            made.append(out[0])
            origin.append(i)
    return np.stack(made), np.asarray(origin)


def insert_calcification(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The slice with one small saturated oval in its brain tissue (semi-axes 1.5–4 px,
    grey 250–255, edge softened by 0.7 px, no rim): what calcified plexus, pineal or basal
    ganglia look like in a brain window, labelled negative (``--calcifications``)."""
    brain = brain_region(grey)
    if brain.sum() < 500:
        return None
    g = grey.astype(np.float32)
    a, b = rng.uniform(1.5, 4.0, size=2)
    depth = ndi.distance_transform_edt(brain)
    room = np.argwhere(depth > max(a, b) + 6)
    if len(room) == 0:
        return None
    r, c = room[rng.integers(len(room))]
    inside = ellipse_distance(g.shape, (r, c), (a, b), rng.uniform(0, np.pi))
    soft = ndi.gaussian_filter((inside <= 1).astype(np.float32), 0.7)
    out = soft * rng.uniform(250, 255) + (1 - soft) * g
    return np.clip(out, 0, 255).astype(np.uint8)


def dump(args: argparse.Namespace) -> None:
    cache = PreparedCache(args.cache)
    rows = np.flatnonzero(cache.ok)
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    y = cache.labels()[rows, 0].astype(np.int64)
    source_all, names = ss.source_ids(cache)
    source = source_all[rows]
    folds = split(
        SimpleNamespace(source=source, y=y), cache.index["fold"].to_numpy()[rows], args.fold_seed
    )
    synth, origin = copies(brain, y)
    labels_of_copies = np.ones(len(synth), np.int64)
    if args.calcifications:
        calcs, calc_origin = [], []
        for i in np.flatnonzero(y == 0):
            made = insert_calcification(brain[i], np.random.default_rng(2000 + int(i)))
            if made is not None:
                calcs.append(made)
                calc_origin.append(i)
        synth = np.concatenate([synth, np.stack(calcs)])
        origin = np.concatenate([origin, np.asarray(calc_origin)])
        labels_of_copies = np.concatenate([labels_of_copies, np.zeros(len(calcs), np.int64)])
    if args.crop == "zoom":
        view = np.stack([zoom_centre(g) for g in brain])
        synth_view = np.stack([zoom_centre(g) for g in synth])
        backbones = ["efficientnet_lite0"]
        for b in backbones:
            ss.FEATURE_VERSIONS[b] += "-zoomcrop"  # as cv_members.py --crop zoom keys them
    else:
        view, synth_view, backbones = brain, synth, list(model.BACKBONES)
    n, m = len(rows), len(synth)
    print(f"{n} slices, {m} synthetic copies of negatives, sources {names}", flush=True)
    maps = []
    for b in backbones:
        t0 = time.monotonic()
        real, _ = ss.FeatureMaps.compute(view, ss.default_feature_cache(), LiteMaps(b), False)
        fake, computed = ss.FeatureMaps.compute(
            synth_view, ss.default_feature_cache(), LiteMaps(b), False
        )
        maps.append(
            ss.FeatureMaps(
                real.source,
                torch.cat([real.fine, fake.fine], dim=1),
                torch.cat([real.deep, fake.deep], dim=1),
            )
        )
        print(f"{b}: {computed} copies' maps computed in {time.monotonic() - t0:.0f} s", flush=True)
    y_all = np.concatenate([y, labels_of_copies])
    source_aug = np.concatenate([source, source[origin]])  # a copy keeps its set's source
    result: dict[str, np.ndarray] = {"y": y, "folds": folds, "origin": origin}
    for fold in sorted(set(folds[folds >= 0])):
        t0 = time.monotonic()
        tr = np.flatnonzero((folds != fold) & ((source != 0) | (folds >= 0)))
        va = np.flatnonzero(folds == fold)
        lent = n + np.flatnonzero(np.isin(origin, tr))
        fit_rows = tr if args.control else np.concatenate([tr, lent])
        zero = torch.zeros(len(va), dtype=torch.long)
        logits = np.zeros((2, len(va), len(maps)), np.float32)
        for k, reader in enumerate(maps):
            head = ss.fit_mil(reader, fit_rows, y_all, source_aug, len(names), args.seed)
            with torch.no_grad():
                for v in range(2):
                    logits[v, :, k] = head(*reader.take(va, v), zero).numpy()
        result[f"val_rows_{fold}"] = va
        result[f"val_mil_{fold}"] = logits
        print(
            f"fold {fold}: {len(lent)} copies lent, {time.monotonic() - t0:.0f} s", flush=True
        )
    np.savez(args.out, **result)


def score(groups: list[str]) -> None:
    """The shipped rule, and the same with the candidate's MIL logits in place of the brain
    readers' (and the centre reader's) MIL columns."""
    totals = {k: [0, 0, []] for k in ("ships", "synth")}
    for group in groups:
        shipped_runs, cand = group.split(":")
        runs = [np.load(p) for p in shipped_runs.split("+")]
        brain_c, zoom_c = (np.load(p) for p in cand.split("+"))
        blobs = np.load(blob_path(shipped_runs))
        ys, probs = [], {"ships": [], "synth": []}
        for fold, (rows, y, readers, forest) in enumerate(fold_parts(runs)):
            assert np.array_equal(rows, brain_c[f"val_rows_{fold}"])
            assert np.array_equal(rows, zoom_c[f"val_rows_{fold}"])
            blob = blobs[f"blob_{fold}"]
            probs["ships"].append(expit(shipped(readers, forest, blob)).mean(0))
            swapped = [r.copy() for r in readers]
            for k in range(3):
                swapped[k][..., 0] = brain_c[f"val_mil_{fold}"][..., k]
            swapped[4][..., 0] = zoom_c[f"val_mil_{fold}"][..., 0]
            probs["synth"].append(expit(shipped(swapped, forest, blob)).mean(0))
            ys.append(y)
        y = np.concatenate(ys)
        parts = [shipped_runs.split("+")[0].rsplit("/", 1)[-1]]
        parts += [tally(totals[k], k, y, np.concatenate(probs[k])) for k in totals]
        print("  ".join(parts), flush=True)
    print_totals(totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("cache")
    d.add_argument("out")
    d.add_argument("--crop", default="brain", choices=["brain", "zoom"])
    d.add_argument("--fold-seed", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--control", action="store_true")
    d.add_argument(
        "--calcifications",
        action="store_true",
        help="also lend each negative a copy with a saturated oval, labelled negative",
    )
    s = sub.add_parser("score")
    s.add_argument("groups", nargs="+")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args)
    else:
        score(args.groups)


if __name__ == "__main__":
    main()
