"""Session 15: the blob forest reads each blob's patch through a frozen network too.

The blob forest (ichscan.models.blobs, session 12) describes each bright blob of the brain
crop by 22 hand-made numbers. The head_ct positives every lab split still gets wrong are
plain bright ovals of blood (SESSION14.md), and the forest is lukewarm on them (+0.9).
Here each blob also gets the frozen EfficientNet-Lite0's view of a patch around it: a
square of side max(PATCH_MIN, PATCH_SCALE × the blob's larger side) of the 320 px brain
crop, centred on the blob, resized to PATCH_PX, read by Lite0 and mean-pooled over space
(last 8×8-block + head channels: 1472 numbers). Per fold, a PCA fitted on the training
slices' blobs keeps N_COMPONENTS of them, appended to the blob's 22 numbers; the product's
fit_blob_forest then learns from the 22 + N_COMPONENTS columns, and the candidate's sum is
the shipped rule with that forest's logit in the blob forest's place.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/patch_lab.py \
        dump CACHE PATCHES.npz BRAIN.npz+HEAD.npz+ZOOM.npz [...]
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/patch_lab.py \
        score BRAIN.npz+HEAD.npz+ZOOM.npz [...]

``dump`` computes (or reuses) every slice's patch features in PATCHES.npz, then per group
fits the candidate forest per fold and saves its [V, N] validation logits beside the
group's first run (``*.patch.npz``); ``score`` prints pooled AUC and slices right at 0.5 of
the shipped rule and the candidate, per group and summed (vote_rules.py's cached blob
logits for the shipped rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from blob_rules import blob_tables, dump_fold_logits
from scipy import ndimage as ndi
from vote_rules import lab_cli

from ichscan.data.cache import PreparedCache
from ichscan.models import blobs as B
from ichscan.models.small_set import LiteMaps
from ichscan.preprocess.head_crop import brain_region
from ichscan.train.small_set import fit_blob_forest

PATCH_MIN = 48  # px of the 320 px crop: about 4 cm of a 25 cm head
PATCH_SCALE = 3.0
PATCH_PX = 128
N_COMPONENTS = 16


def blob_boxes(grey: np.ndarray) -> np.ndarray:
    """[K, 4] (centre row, centre col, height, width) in the crop's pixels of the blobs
    ``blob_table`` describes, in its row order (its candidate selection, repeated)."""
    brain = brain_region(grey)
    if brain.sum() < 500:
        return np.zeros((0, 4))
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    m = B._MARGIN
    top0, left0 = max(rows[0] - m, 0), max(cols[0] - m, 0)
    box = np.s_[top0 : rows[-1] + m + 1, left0 : cols[-1] + m + 1]
    g = np.asarray(grey, dtype=np.float32)[box]
    brain = brain[box]
    inner = ndi.binary_erosion(brain, iterations=B._ERODE)
    med = float(np.median(g[inner]))
    bright = ndi.binary_opening((g >= med + B.ABOVE) & inner, iterations=1)
    labels, n = ndi.label(bright)
    if n == 0:
        return np.zeros((0, 4))
    sizes = ndi.sum_labels(bright, labels, np.arange(1, n + 1))
    found = ndi.find_objects(labels)
    out = []
    for j in np.argsort(-sizes, kind="stable")[: B.MAX_BLOBS]:
        if sizes[j] < B._MIN_PIXELS:
            continue
        ys, xs = np.nonzero(labels[found[j]] == j + 1)
        r, c = found[j][0].start + top0 + ys.mean(), found[j][1].start + left0 + xs.mean()
        out.append(
            (r, c, found[j][0].stop - found[j][0].start, found[j][1].stop - found[j][1].start)
        )
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def patches(grey: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 [K, PATCH_PX, PATCH_PX]: the square around each blob, zero outside the crop."""
    from PIL import Image

    image = Image.fromarray(grey)
    out = np.zeros((len(boxes), PATCH_PX, PATCH_PX), np.uint8)
    for k, (r, c, h, w) in enumerate(boxes):
        half = max(PATCH_MIN, PATCH_SCALE * max(h, w)) / 2
        extent = (c - half + 0.5, r - half + 0.5, c + half + 0.5, r + half + 0.5)
        out[k] = np.asarray(
            image.transform(
                (PATCH_PX, PATCH_PX), Image.Transform.EXTENT, extent, Image.Resampling.BILINEAR
            )
        )
    return out


def patch_features(cache_dir: str, out: Path) -> np.ndarray:
    """float32 [2, N, MAX_BLOBS, 1472]: every usable slice's (and its mirror's) blob patches
    read by Lite0, zeros where blob_table has no row; cached in ``out``."""
    if out.exists():
        return np.load(out)["features"]
    cache = PreparedCache(cache_dir)
    greys = [np.asarray(cache[int(r)])[..., 0] for r in np.flatnonzero(cache.ok)]
    net = LiteMaps("efficientnet_lite0")
    keep = torch.nn.Identity()  # read at PATCH_PX: not resized to the readers' 256 px
    features = np.zeros((2, len(greys), B.MAX_BLOBS, 1472), np.float32)
    for v in range(2):
        for i, grey in enumerate(greys):
            g = np.ascontiguousarray(grey[:, ::-1]) if v else grey
            boxes = blob_boxes(g)
            if len(boxes) == 0:
                continue
            x = torch.from_numpy(patches(g, boxes)).float().div(255)[:, None]
            with torch.no_grad():
                _, deep = net(x, keep)
            features[v, i, : len(boxes)] = deep.mean(dim=(2, 3)).numpy()
        print(f"view {v}: {len(greys)} slices", flush=True)
    np.savez(out, features=features)
    return features


def with_components(tables: np.ndarray, features: np.ndarray, train: np.ndarray) -> np.ndarray:
    """[2, N, K, 22 + N_COMPONENTS]: the blob tables with the PCA (fitted on the blobs of
    the ``train`` slices, both views) of their patch features appended."""
    from sklearn.decomposition import PCA

    present = B.blob_present(tables)
    fit = features[:, train][present[:, train]]
    pca = PCA(N_COMPONENTS, random_state=0).fit(fit)
    comps = np.zeros((*tables.shape[:3], N_COMPONENTS), np.float32)
    comps[present] = pca.transform(features[present])
    return np.concatenate([tables, comps], axis=-1)


def patch_path(group: str) -> Path:
    return Path(group.split("+")[0]).with_suffix(".patch.npz")


def dump(cache: str, patch_file: str, groups: list[str]) -> None:
    tables = blob_tables(cache)
    features = patch_features(cache, Path(patch_file))
    assert features.shape[:3] == tables.shape[:3]
    # The boxes are blob_table's rows: a patch exactly where the table has a blob.
    assert np.array_equal(np.abs(features).sum(-1) > 0, B.blob_present(tables))

    def fit(train: np.ndarray, y: np.ndarray, fold: int):
        enriched = with_components(tables, features, train)
        return fit_blob_forest(enriched, train, y, fold), enriched

    dump_fold_logits(groups, "patch", patch_path, fit)


if __name__ == "__main__":
    lab_cli("patch", dump, patch_path)
