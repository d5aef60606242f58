"""Near-duplicate grouping: what keeps a copy of a test slice out of the training folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ichscan.data.similar import similar_groups, thumbnails

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _head(rng: np.random.Generator, size: int = 200) -> np.ndarray:
    """A grey disc with a bright rim and random blotches: a head-like slice of its own."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.45, 0.55, 2) * size
    a, b = rng.uniform(0.3, 0.45, 2) * size
    d = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2
    img = np.where(d < 1, 100.0, 0.0) + np.where((d > 0.85) & (d < 1), 150.0, 0.0)
    for _ in range(6):
        by, bx = rng.uniform(0.3, 0.7, 2) * size
        img += 60 * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (size / 12) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_a_rescaled_recropped_copy_joins_its_original_and_others_stay_apart(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(6):
        path = tmp_path / f"{k}.png"
        Image.fromarray(_head(rng)).save(path)
        paths.append(path)
    original = np.asarray(Image.open(paths[2]))
    copy = Image.fromarray(original[3:-2, 2:-3]).resize((130, 131))  # re-cropped, rescaled
    copy.convert("RGB").save(tmp_path / "copy.png")  # and saved in another mode
    paths.append(tmp_path / "copy.png")

    groups, pairs = similar_groups(paths)

    assert groups[6] == groups[2]
    assert len(set(groups.tolist())) == 6
    assert pairs[0][:2] == (2, 6) and pairs[0][2] > 0.95


def test_linking_is_transitive(tmp_path: Path) -> None:
    """A chain of neighbouring slices is one patient even where its ends differ."""
    base = _head(np.random.default_rng(1)).astype(np.float64)
    paths = []
    for k in range(4):
        shifted = np.roll(base, 6 * k, axis=1)
        path = tmp_path / f"{k}.png"
        Image.fromarray(shifted.astype(np.uint8)).save(path)
        paths.append(path)
    thumbs = thumbnails(paths)
    r = thumbs @ thumbs.T / thumbs.shape[1]
    threshold = float(min(r[k, k + 1] for k in range(3))) - 1e-6
    assert r[0, 3] < threshold  # the ends alone would not be linked

    groups, _ = similar_groups(paths, threshold)

    assert len(set(groups.tolist())) == 1


@pytest.mark.skipif(not (SHARED / "head_ct").exists(), reason="../shared/data/head_ct is absent")
def test_the_known_copies_in_head_ct_are_grouped() -> None:
    """head_ct holds 198/199 (one slice at two scales) and 011/061 (re-cropped)."""
    images = SHARED / "head_ct" / "images"
    names = ["198", "199", "011", "061", "000"]
    groups, _ = similar_groups([images / f"{n}.png" for n in names])
    assert groups[0] == groups[1]
    assert groups[2] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
