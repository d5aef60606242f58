"""Bright blobs of a brain-cropped, brain-window slice, one row of numbers per blob.

The density features (ichscan.models.density) describe a slice as a whole: how much of the
brain is bright, how big its largest bright blob is. On the real sets that ranks a slice
with one small bleed (a 15 px thalamic or parietal bleed) below normal slices that hold
calcified choroid plexus, the pineal gland or the skull's bright rim, because those are
bright blobs too. What tells blood from them is the blob itself: blood is 50–90 HU, short of
the saturated grey of calcium and bone; it sits in brain rather than in a dark ventricle or
against the skull; it rarely has a mirror twin in the other hemisphere. So every candidate
blob (brighter than the brain's median by ``ABOVE`` grey levels) gets its own row: size,
brightness, saturation, texture, surroundings, shape, depth, position and symmetry. A
forest scores each blob, and a slice scores its most blood-like blob
(ichscan.models.small_set.blob_logit; research/recipe_lab/SESSION12.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ichscan.preprocess.head_crop import brain_region

MAX_BLOBS = 16  # the largest ones; a slice with more has them in its count feature
N_BLOB_FEATURES = 22
ABOVE = 40  # grey levels over the brain's median (a 40/80 window: about 12 HU)
_MIN_PIXELS = 8  # smaller is noise: about 5 mm² where a 25 cm head spans 320 px
_ERODE = 3  # px off the brain's edge, where the skull's partial volume is bright
_NEAR, _FAR = 4, 10  # px: the rings a blob's surroundings are read in
_SATURATED = 250  # grey: calcium and bone, not blood, in a brain window
_DARK_BELOW = 25  # grey levels under the median: CSF (choroid plexus sits in it)
_MARGIN = _FAR + 1


def blob_table(grey: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W] brain-cropped brain-window slice → float32 [MAX_BLOBS, N_BLOB_FEATURES]:
    one row per candidate blob, largest first, rows of zeros after the last. A real row's
    first value (log of the area in pixels) is at least log 8 > 0: what tells it from padding
    (:func:`blob_present`). A slice without enough brain gives no rows. ``brain``: the
    slice's ``brain_region`` when the caller has it already."""
    table = np.zeros((MAX_BLOBS, N_BLOB_FEATURES), dtype=np.float32)
    brain = brain_region(grey) if brain is None else brain
    if brain.sum() < 500:
        return table
    # Everything below is read within the brain or within _FAR px of a blob in it: work on
    # the brain's bounding box with a margin of background, which gives the same table as
    # the whole square (every feature is relative to the brain's own extent) at about half
    # the pixels for the morphology and the distance transform.
    rows, cols = np.flatnonzero(brain.any(1)), np.flatnonzero(brain.any(0))
    box = np.s_[
        max(rows[0] - _MARGIN, 0) : rows[-1] + _MARGIN + 1,
        max(cols[0] - _MARGIN, 0) : cols[-1] + _MARGIN + 1,
    ]
    g = np.asarray(grey, dtype=np.float32)[box]
    brain = brain[box]
    inner = ndi.binary_erosion(brain, iterations=_ERODE)
    values = g[inner]
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) + 1.0
    bright_all = (g >= med + ABOVE) & inner
    bright = ndi.binary_opening(bright_all, iterations=1)
    labels, n = ndi.label(bright)
    if n == 0:
        return table
    rows, cols = rows - box[0].start, cols - box[1].start
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    extent = float(max(height, width))
    cx = (cols[0] + cols[-1]) / 2
    edge_distance = ndi.distance_transform_edt(brain)
    # The other hemisphere's bright pixels, mirrored about the brain's midline.
    shift = int(np.rint(2 * cx - (g.shape[1] - 1)))
    mirror_bright = np.roll(bright_all[:, ::-1], shift, axis=1)
    dark = (g < med - _DARK_BELOW) & brain
    sizes = ndi.sum_labels(bright, labels, np.arange(1, n + 1))
    boxes = ndi.find_objects(labels)
    brain_area = float(brain.sum())
    k = 0
    for j in np.argsort(-sizes, kind="stable")[:MAX_BLOBS]:
        if sizes[j] < _MIN_PIXELS:
            continue
        # Everything about a blob lies within _FAR px of it: work in that window.
        box = boxes[j]
        top, bottom = max(box[0].start - _MARGIN, 0), min(box[0].stop + _MARGIN, g.shape[0])
        left, right = max(box[1].start - _MARGIN, 0), min(box[1].stop + _MARGIN, g.shape[1])
        win = np.s_[top:bottom, left:right]
        blob = labels[win] == (j + 1)
        gw, brain_w = g[win], brain[win]
        px = gw[blob]
        ys, xs = np.nonzero(blob)
        near = ndi.binary_dilation(blob, iterations=_NEAR)
        ring = near & ~blob & brain_w
        far = ndi.binary_dilation(blob, iterations=_FAR) & ~near & brain_w
        ring_values = gw[ring] if ring.any() else np.array([med])
        far_values = gw[far] if far.any() else np.array([med])
        area = float(blob.sum())
        perimeter = area - float(ndi.binary_erosion(blob).sum())
        spread = np.cov(np.stack([ys, xs]).astype(np.float64)) + 1e-6 * np.eye(2)
        minor, major = np.sort(np.linalg.eigvalsh(spread))
        distances = edge_distance[win][blob]
        table[k] = [
            np.log(area),
            area / brain_area,
            px.mean() - med,
            np.percentile(px, 90) - med,
            (px.mean() - med) / mad,
            float((px >= _SATURATED).mean()),
            float(px.std()),
            ring_values.mean() - med,
            far_values.mean() - med,
            float(np.percentile(ring_values, 10)) - med,
            float(dark[win][ring].mean()) if ring.any() else 0.0,
            4 * np.pi * area / max(perimeter, 1.0) ** 2,
            area / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)),
            np.sqrt(max(minor, 0.0) / major),
            float(distances.max()) / extent,
            float(distances.min()) / extent,
            (top + ys.mean() - rows[0]) / height,
            abs(left + xs.mean() - cx) / width,
            float(mirror_bright[win][blob].mean()),
            float(sizes[j]) / float(sizes.max()),
            float(n),
            med,
        ]
        k += 1
    return table


def batch_blobs(greys: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] → float32 [N, MAX_BLOBS, N_BLOB_FEATURES]: :func:`blob_table` of each."""
    if len(greys) == 0:
        return np.zeros((0, MAX_BLOBS, N_BLOB_FEATURES), dtype=np.float32)
    return np.stack([blob_table(g) for g in greys])


def blob_present(table: Any) -> Any:
    """[..., MAX_BLOBS, N_BLOB_FEATURES] → bool [..., MAX_BLOBS]: rows that are blobs (NumPy
    arrays and torch tensors alike)."""
    return table[..., 0] > 0
