"""Hand-made density features of a brain-cropped, brain-window slice.

Fresh blood is denser than brain (50–90 HU against 20–45): in a 40/80 window it is a bright
blob inside the brain. These 29 numbers describe how much of the brain is that bright, how
the largest bright blob looks, and how asymmetric the two hemispheres are. A random forest on
them is weak alone (AUC 0.89–0.95 on the real sets) but the best partner for the CNN features
in the small-set ensemble (research/recipe_lab/RECIPE.md, experiments 9, 10, 16).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ichscan.preprocess.head_crop import brain_region

N_FEATURES = 29
_ABSOLUTE = (170, 190, 210, 230, 250)
_RELATIVE = (1.4, 1.6, 1.8, 2.0)
_ABOVE = (40, 60, 80)
_BLOB_ABOVE = (50, 70)


def _blob_features(g: np.ndarray, inner: np.ndarray, med: float, above: float) -> list[float]:
    bright = ndi.binary_opening((g >= med + above) & inner, iterations=1)
    labels, n = ndi.label(bright)
    if n == 0:
        return [0.0] * 5
    area = float(inner.sum())
    sizes = ndi.sum_labels(bright, labels, index=np.arange(1, n + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    perimeter = float(largest.sum() - ndi.binary_erosion(largest).sum())
    compactness = 4 * np.pi * float(sizes.max()) / max(perimeter, 1.0) ** 2 / 10
    return [
        float(sizes.max()) / area,
        float(n),
        float(sizes.sum()) / area,
        compactness,
        float(g[largest].mean() - med),
    ]


def _asymmetry(g: np.ndarray, inner: np.ndarray) -> list[float]:
    cols = np.flatnonzero(inner.any(axis=0))
    centre = (cols[0] + cols[-1]) // 2
    shift = 2 * centre - (g.shape[1] - 1)
    mirrored = np.roll(g[:, ::-1], shift, axis=1)
    both = inner & np.roll(inner[:, ::-1], shift, axis=1)
    if both.sum() <= 100:
        return [0.0, 0.0, 0.0]
    d = g[both] - mirrored[both]
    return [float(np.abs(d).mean()), float((d > 40).mean()), float((d > 60).mean())]


def inner_brain(grey: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray | None:
    """Where the features look: the brain eroded by 8 px, clear of the skull's partial-volume
    rim, which is as bright as blood (the whole brain when that leaves too little); None
    when there is not enough brain (the vertex, a blank image). ``brain``: the slice's
    ``brain_region`` when the caller has it already."""
    brain = brain_region(grey) if brain is None else brain
    inner = ndi.binary_erosion(brain, iterations=8)
    if inner.sum() < 500:
        inner = brain
    return inner if inner.sum() >= 50 else None


def density_features(grey: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """uint8 [H, W] brain-cropped brain-window slice → float32 [29]. A slice without enough
    brain (the vertex, a blank image) gives zeros. ``brain``: as for :func:`inner_brain`."""
    g = np.asarray(grey, dtype=np.float32)
    inner = inner_brain(grey, brain)
    if inner is None:
        return np.zeros(N_FEATURES, dtype=np.float32)
    v = g[inner]
    med = float(np.median(v))
    f = [med, float(v.std()), float(np.percentile(v, 90)), float(np.percentile(v, 99))]
    f += [float((v >= t).mean()) for t in _ABSOLUTE]
    f += [float((v >= r * med).mean()) for r in _RELATIVE]
    f += [float((v >= med + d).mean()) for d in _ABOVE]
    for above in _BLOB_ABOVE:
        f += _blob_features(g, inner, med, above)
    f += _asymmetry(g, inner)
    return np.asarray(f, dtype=np.float32)


def batch_density(greys: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] → float32 [N, 29]: :func:`density_features` of every slice."""
    if len(greys) == 0:
        return np.zeros((0, N_FEATURES), dtype=np.float32)
    return np.stack([density_features(g) for g in greys])
