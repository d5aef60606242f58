"""Preview montages: slices in columns, windows in rows, each tile and row labelled so that
the labels stay readable over whatever the slice shows."""

from __future__ import annotations

import numpy as np

from ichscan.io.montage import TILE, montage, preview_indices
from ichscan.scan import Scan


def bright_scan(n: int = 3) -> Scan:
    """Bone everywhere: white in the brain and bone windows alike, as the skull is in a tight
    crop's corners, where the labels are drawn."""
    return Scan(
        hu=np.full((n, 32, 32), 2000.0, dtype=np.float32),
        affine=np.eye(4),
        slice_ids=[str(i) for i in range(n)],
        spacing=(5.0, 0.5, 0.5),
    )


def test_labels_stay_readable_on_a_white_slice() -> None:
    sheet = np.asarray(montage(bright_scan(), windows=("brain", "bone"), n_slices=3))
    assert sheet.shape == (2 * TILE, 3 * TILE)
    for top, left in ((4, 4), (4, TILE + 4), (TILE + 4, 2 * TILE + 4)):  # slice numbers
        label = sheet[top : top + 10, left : left + 8]
        assert (label < 40).any() and (label > 200).any()  # white digit on a dark band
    row_label = sheet[TILE - 14 : TILE - 4, 4:60]  # "brain 40/80" at the first row's foot
    assert (row_label < 40).mean() > 0.3 and (row_label > 200).any()
    assert (sheet[TILE // 2, TILE // 2] == 255).all()  # the slice itself untouched


def test_preview_picks_slices_away_from_the_ends() -> None:
    assert list(preview_indices(100, 4)) == [10, 36, 63, 89]
    assert list(preview_indices(3, 8)) == [0, 1, 2]
