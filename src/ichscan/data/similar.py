"""Group images that are probably the same patient, for sets that carry no patient ids.

Public slice sets built from figures (the Kaggle head_ct PNGs) hold the same slice twice at
another crop or scale, and neighbouring slices of one patient under consecutive ids. Split
as one patient per image, a copy of a test slice sits in the training folds and the
cross-validated figures come out optimistic. Downscaled to a 32×32 thumbnail, two images of
one slice correlate at r ≥ 0.99, neighbouring slices of one head at about 0.9 to 0.97 (the
same skull outline and window), slices of different heads mostly lower. Linking every pair
at or above a threshold and taking connected groups errs on the safe side: two patients
wrongly joined only make the split coarser, while one patient wrongly parted leaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from ichscan.io.image import read_grey

THUMBNAIL = 32  # px: coarse enough that re-cropping and rescaling a slice barely move it
SAME_PATIENT_R = 0.9  # thumbnails correlating at least this much are taken as one patient


def thumbnails(paths: Sequence[str | Path], side: int = THUMBNAIL) -> np.ndarray:
    """float [N, side²]: each image as a grey side×side thumbnail (box filter), centred and
    scaled to unit variance, so a dot product over side² is Pearson's r."""
    out = np.empty((len(paths), side * side), dtype=np.float64)
    for i, path in enumerate(paths):
        grey = Image.fromarray(read_grey(path)).resize((side, side), Image.Resampling.BOX)
        t = np.asarray(grey, dtype=np.float64).ravel()
        out[i] = (t - t.mean()) / (t.std() or 1.0)
    return out


def similar_groups(
    paths: Sequence[str | Path], min_r: float = SAME_PATIENT_R
) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """(group number of each image, the linked pairs (i, j, r) with r ≥ min_r, strongest
    first). Images with no partner are a group of their own."""
    thumbs = thumbnails(paths)
    r = thumbs @ thumbs.T / thumbs.shape[1]
    i, j = np.nonzero(np.triu(r >= min_r, k=1))
    linked = csr_matrix((np.ones(len(i)), (i, j)), shape=(len(paths), len(paths)))
    _, groups = connected_components(linked, directed=False)
    pairs = sorted(
        ((int(a), int(b), float(r[a, b])) for a, b in zip(i, j, strict=True)),
        key=lambda p: -p[2],
    )
    return groups, pairs
