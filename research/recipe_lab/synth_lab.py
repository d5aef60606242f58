"""Session 15: the blob forest also learns from synthetic bleeds put into normal slices.

The blob forest learns which bright blobs are blood from slice labels only (multiple-instance
learning), from about a hundred positive training slices, most of them large bleeds. Here
each negative training slice (both sets) also lends one known instance of blood: an ellipse
put into its brain tissue, semi-axes 3–12 px of the 320 px crop, at random orientation, the
tissue raised by 50–110 grey levels (about 15–35 HU in a 40/80 window) with its texture kept
and the result held under the saturated grey of calcium (245), its edge softened (Gaussian,
sigma 1 px); on half of them a rim of edema 2–4 px wide, 10–25 grey levels darker. The blob
table row of the blob at the ellipse's centre (identity and mirror image) is a positive
instance in both rounds of the product's MIL fit (never dropped by the second round's pick);
everything else is fit_blob_forest as shipped. The candidate's sum is the shipped rule with
this forest's logit in the blob forest's place.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/synth_lab.py \
        dump CACHE SYNTH.npz BRAIN.npz+HEAD.npz+ZOOM.npz [...]
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/synth_lab.py \
        score BRAIN.npz+HEAD.npz+ZOOM.npz [...]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from blob_rules import blob_tables, dump_fold_logits
from patch_lab import blob_boxes
from scipy import ndimage as ndi
from vote_rules import lab_cli

from ichscan.data.cache import PreparedCache
from ichscan.models.blobs import blob_present, blob_table
from ichscan.preprocess.head_crop import brain_region
from ichscan.train import small_set as ss
from ichscan.train.small_set import ForestModule, _blob_trees

AXES = (3.0, 12.0)  # px, semi-axes
RAISE = (50.0, 110.0)  # grey levels over the tissue
CEILING = 245.0  # under the saturated grey (250) of calcium and bone
RIM = (2, 4, 10.0, 25.0)  # width px (low, high), darker by grey levels (low, high)


def ellipse_distance(shape: tuple, centre: tuple, axes: tuple, theta: float) -> np.ndarray:
    """(u/a)^2 + (v/b)^2 of every pixel for an ellipse at ``centre`` (row, col) with
    semi-axes ``axes`` turned by ``theta``: at most 1 inside it."""
    (r, c), (a, b) = centre, axes
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    u = (xx - c) * np.cos(theta) + (yy - r) * np.sin(theta)
    v = -(xx - c) * np.sin(theta) + (yy - r) * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2


def insert_bleed(grey: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple] | None:
    """(the slice with one synthetic bleed, its centre (row, col)); None without room."""
    brain = brain_region(grey)
    if brain.sum() < 500:
        return None
    g = grey.astype(np.float32)
    med = float(np.median(g[brain]))
    a, b = rng.uniform(*AXES, size=2)
    depth = ndi.distance_transform_edt(brain)
    tissue = np.abs(ndi.uniform_filter(g, 9) - med) < 20
    room = np.argwhere((depth > max(a, b) + 6) & tissue)
    if len(room) == 0:
        return None
    r, c = room[rng.integers(len(room))]
    inside = ellipse_distance(g.shape, (r, c), (a, b), rng.uniform(0, np.pi))
    soft = ndi.gaussian_filter((inside <= 1).astype(np.float32), 1.0)
    out = g.copy()
    if rng.random() < 0.5:
        width = rng.integers(RIM[0], RIM[1] + 1)
        ring = ndi.binary_dilation(inside <= 1, iterations=int(width)) & (inside > 1) & brain
        out[ring] -= rng.uniform(RIM[2], RIM[3])
    raised = np.minimum(g + rng.uniform(*RAISE), CEILING)
    out = np.where(soft > 0, soft * np.maximum(raised, out) + (1 - soft) * out, out)
    return np.clip(out, 0, 255).astype(np.uint8), (float(r), float(c))


def bleed_row(grey: np.ndarray, centre: tuple) -> np.ndarray | None:
    """The blob table row of the blob nearest ``centre`` (within 4 px), or None."""
    table, boxes = blob_table(grey), blob_boxes(grey)
    if len(boxes) == 0:
        return None
    d = np.hypot(boxes[:, 0] - centre[0], boxes[:, 1] - centre[1])
    k = int(np.argmin(d))
    return table[k] if d[k] <= 4 else None


def synthetic_rows(cache_dir: str, y: np.ndarray, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rows [M, F] of synthetic blood, identity and mirror; the slice each came from [M]),
    one bleed per negative slice (fixed seed per slice); cached in ``out``."""
    if out.exists():
        z = np.load(out)
        return z["x"], z["owner"]
    cache = PreparedCache(cache_dir)
    greys = [np.asarray(cache[int(r)])[..., 0] for r in np.flatnonzero(cache.ok)]
    xs, owners = [], []
    for i in np.flatnonzero(y == 0):
        made = insert_bleed(greys[i], np.random.default_rng(1000 + int(i)))
        if made is None:
            continue
        image, (r, c) = made
        mirror = np.ascontiguousarray(image[:, ::-1])
        for g, centre in ((image, (r, c)), (mirror, (r, image.shape[1] - 1 - c))):
            row = bleed_row(g, centre)
            if row is not None:
                xs.append(row)
                owners.append(i)
    x, owner = np.asarray(xs, np.float32), np.asarray(owners)
    np.savez(out, x=x, owner=owner)
    print(f"{len(x)} synthetic rows from {len(np.unique(owner))} negative slices", flush=True)
    return x, owner


def fit_with_synthetic(
    blobs: np.ndarray, rows: np.ndarray, y: np.ndarray, seed: int, extra: np.ndarray
) -> ForestModule:
    """fit_blob_forest with ``extra`` known blood rows in both rounds (kept by the second)."""
    tables = blobs[:, rows]
    present = blob_present(tables)
    x = tables[present]
    owner = np.broadcast_to(np.arange(len(rows))[None, :, None], present.shape)[present]
    label = y[rows][owner]
    x = np.concatenate([x, extra])
    owner = np.concatenate([owner, np.full(len(extra), -1)])
    label = np.concatenate([label, np.ones(len(extra), int)])
    forest = _blob_trees(x, label, seed, oob=True)
    votes = np.nan_to_num(forest.oob_decision_function_[:, 1], nan=0.0)
    keep = (label == 0) | (owner == -1)
    for slice_ in np.unique(owner[(label == 1) & (owner >= 0)]):
        mine = np.flatnonzero(owner == slice_)
        keep[mine[np.argsort(-votes[mine], kind="stable")[: ss.BLOB_KEEP]]] = True
    return ForestModule.from_sklearn(_blob_trees(x[keep], label[keep], seed, oob=False))


def synth_path(group: str) -> Path:
    return Path(group.split("+")[0]).with_suffix(".synth.npz")


def dump(cache: str, synth_file: str, groups: list[str]) -> None:
    tables = blob_tables(cache)
    y_all = np.load(groups[0].split("+")[0])["y"]
    extra, owner = synthetic_rows(cache, y_all, Path(synth_file))

    def fit(train: np.ndarray, y: np.ndarray, fold: int):
        assert np.array_equal(y, y_all), "groups on different slices"
        return fit_with_synthetic(tables, train, y, fold, extra[np.isin(owner, train)]), tables

    dump_fold_logits(groups, "synth", synth_path, fit)


if __name__ == "__main__":
    lab_cli("synth", dump, synth_path)
