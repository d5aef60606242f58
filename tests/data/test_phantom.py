"""The head phantom looks like head CT where the pipeline looks: air, scalp, skull, brain,
ventricles and (optionally) one hyperdense bleed whose mask marks exactly that bleed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from ichscan.data.phantom import make_head_phantom

SPACING = (5.0, 0.9, 0.9)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_head_phantom((32, 256, 256), SPACING, seed=0)


def test_shapes_and_types(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    assert hu.shape == mask.shape == (32, 256, 256)
    assert hu.dtype == np.int16 and mask.dtype == bool


def test_air_outside_the_head(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, _ = phantom
    corners = hu[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.abs(corners + 1000).max() <= 25
    # The head is 150 mm tall in a 160 mm stack: the end slices miss it.
    for k in (0, -1):
        assert np.abs(hu[k].astype(np.int32) + 1000).max() <= 25


def test_profile_through_the_side_of_the_head(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    """Left to right along the middle row: air, thin scalp, ~6 mm of dense skull, then brain."""
    hu, _ = phantom
    row = hu[16, 128].astype(np.int32)
    first_tissue = int(np.argmax(row > -500))
    first_bone = int(np.argmax(row > 500))
    bone = np.flatnonzero(row[: row.size // 2] > 500)
    scalp = row[first_tissue:first_bone]
    assert 2 <= scalp.size <= 7
    assert 25 <= np.median(scalp) <= 55
    assert 4.0 <= bone.size * SPACING[2] <= 8.0
    assert row[bone].max() > 1400 and row[bone].min() > 600
    inside = row[bone[-1] + 3 : bone[-1] + 20]
    assert 20 <= np.median(inside) <= 45


def test_skull_density(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, _ = phantom
    bone = hu[hu > 300]
    assert bone.size > 10_000
    assert bone.min() > 680 and np.median(bone) > 700 and bone.max() <= 1520


def test_brain_and_ventricles() -> None:
    hu, _ = make_head_phantom((32, 256, 256), SPACING, seed=0, bleed=False)
    soft = hu[(hu > -100) & (hu < 100)]
    assert 20 <= np.median(soft) <= 45
    # Deep white matter lateral to the ventricles sits below the ~37 HU cortical ribbon.
    white = hu[16, 100:156, 65:85]
    assert 22 <= np.median(white) <= 32
    # CSF-dense ventricles either side of the midline, above the centre of the head.
    slab = hu[18:21, 110:140]
    for cols in (slice(112, 122), slice(134, 144)):
        assert np.median(slab[:, :, cols]) < 12
    assert np.median(slab[:, :, 125:131]) > 20


def test_bleed_is_hyperdense_and_inside_the_mask(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    assert mask.sum() > 50
    blood = hu[mask]
    assert blood.min() >= 60 and blood.max() <= 90
    assert 60 <= np.median(blood) <= 90
    # Nothing outside the mask is blood-dense except bone.
    lookalike = (hu >= 58) & (hu <= 100) & ~mask
    assert lookalike.sum() < 0.01 * mask.sum()


def test_mask_is_only_inside_the_brain(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    hu, mask = phantom
    # A few millimetres around the bleed is still soft tissue: no skull, no air.
    around = ndimage.binary_dilation(mask, structure=np.ones((1, 11, 11), dtype=bool)) & ~mask
    assert around.any()
    assert hu[around].min() > -100 and hu[around].max() < 100


def test_no_bleed_means_empty_mask() -> None:
    hu, mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=5, bleed=False)
    assert not mask.any()
    assert not ((hu >= 60) & (hu <= 100)).any()


def test_same_seed_same_phantom_other_seed_other_bleed() -> None:
    a_hu, a_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=7)
    b_hu, b_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=7)
    c_hu, c_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=8)
    np.testing.assert_array_equal(a_hu, b_hu)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask)
    assert not np.array_equal(a_hu, c_hu)


def _centroid_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    centre_index = (np.array(mask.shape) - 1) / 2
    return (np.argwhere(mask).mean(axis=0) - centre_index) * np.array(spacing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anatomy_is_defined_in_millimetres(
    phantom: tuple[np.ndarray, np.ndarray], seed: int
) -> None:
    fine_mask = phantom[1] if seed == 0 else make_head_phantom(seed=seed)[1]
    coarse_hu, coarse_mask = make_head_phantom((16, 128, 128), (10.0, 1.8, 1.8), seed=seed)
    np.testing.assert_allclose(
        _centroid_mm(coarse_mask, (10.0, 1.8, 1.8)), _centroid_mm(fine_mask, SPACING), atol=6.0
    )
    # Head width (left-right) is ~150 mm at either spacing.
    width = np.count_nonzero(coarse_hu[8, 64] > -500) * 1.8
    assert 140 <= width <= 160


def test_small_or_coarse_grids_still_bleed() -> None:
    _, small = make_head_phantom((6, 64, 64), SPACING, seed=3)
    _, coarse = make_head_phantom((2, 8, 8), (40.0, 30.0, 30.0), seed=3)
    assert small.any() and coarse.any()


def test_volume_without_brain_cannot_bleed() -> None:
    with pytest.raises(ValueError, match="parenchyma"):
        make_head_phantom((1, 2, 2), (1.0, 200.0, 200.0), seed=0)  # four voxels of air


@pytest.mark.parametrize(
    ("shape", "spacing"), [((0, 8, 8), SPACING), ((4, 8), SPACING), ((4, 8, 8), (1.0, 0.0, 1.0))]
)
def test_bad_geometry_is_refused(shape: tuple, spacing: tuple) -> None:
    with pytest.raises(ValueError):
        make_head_phantom(shape, spacing)


def test_builds_quickly() -> None:
    make_head_phantom((8, 64, 64))  # warm up
    start = time.perf_counter()
    make_head_phantom((32, 256, 256), seed=11)
    # Generous bound for loaded CI machines; a per-voxel Python loop would take minutes.
    assert time.perf_counter() - start < 2.0
