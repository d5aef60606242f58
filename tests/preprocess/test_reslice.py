from __future__ import annotations

import numpy as np
import pytest

from ichscan.preprocess.reslice import reslice, reslice_scan
from ichscan.scan import Scan

BACKGROUND = -1000


def tilted_affine(
    tilt_deg: float, spacing: float, pixel: float = 1.0, origin=(-32.0, -32.0, 0.0)
) -> np.ndarray:
    """Geometry of a gantry tilted about the x axis, as a scanner writes it.

    The image plane is rotated by the tilt; the table (and so the slice step) still moves
    along z. ``spacing`` is the distance between planes measured along their normal.
    """
    theta = np.radians(tilt_deg)
    col = np.array([pixel, 0.0, 0.0])  # along a row: +x
    row = pixel * np.array([0.0, np.cos(theta), -np.sin(theta)])  # down the rows
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, spacing / np.cos(theta)]
    affine[:3, 1] = row
    affine[:3, 2] = col
    affine[:3, 3] = origin
    return affine


def voxel_positions(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Patient coordinates of every voxel centre, [3, S*H*W]."""
    idx = np.indices(shape).reshape(3, -1)
    return affine[:3, :3] @ idx + affine[:3, 3:4]


def sphere_series(
    affine: np.ndarray, shape: tuple[int, int, int], centre, radius: float
) -> np.ndarray:
    inside = np.linalg.norm(voxel_positions(shape, affine).T - centre, axis=1) < radius
    return np.where(inside, 1000, BACKGROUND).astype(np.int16).reshape(shape)


def weighted_centroid(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    weight = np.clip(volume.astype(np.float64) - BACKGROUND, 0, None).reshape(-1)
    return voxel_positions(volume.shape, affine) @ weight / weight.sum()


def in_plane_centroids(volume: np.ndarray) -> np.ndarray:
    """(row, col) centroid of the bright object in each slice that holds enough of it."""
    rows, cols = np.indices(volume.shape[1:])
    out = []
    for plane in volume:
        weight = np.clip(plane.astype(np.float64) - BACKGROUND, 0, None)
        if weight.sum() > 20 * 2000:  # at least ~20 voxels of sphere
            out.append(((rows * weight).sum() / weight.sum(), (cols * weight).sum() / weight.sum()))
    return np.array(out)


def test_tilted_sphere_lands_where_it_is() -> None:
    # 80 slices of 0.625 mm with a 20 degree tilt: the planes slide ~0.23 mm in-plane per
    # slice, 18 mm over the series. The sphere sits away from the middle of the series,
    # where an uncorrected or wrongly signed shift would move it by several mm.
    affine = tilted_affine(20.0, 0.625)
    centre = np.array([2.0, 3.0, 2.0])
    vol = sphere_series(affine, (80, 64, 64), centre, radius=8.0)
    scan = Scan(
        hu=vol, affine=affine, slice_ids=[str(k) for k in range(80)], spacing=(0.625, 1.0, 1.0)
    )
    assert scan.shear_deg == pytest.approx(20.0)
    # The test has teeth: input slices drift in-plane by several pixels.
    drift = in_plane_centroids(vol)
    assert np.ptp(drift[:, 0]) > 3

    out, out_affine = reslice(vol, affine, 5.0)
    assert out.dtype == np.int16 and out.shape == (10, 64, 64)
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, 0]), 5.0)
    np.testing.assert_allclose(out_affine[:3, 1:3], affine[:3, 1:3])
    np.testing.assert_allclose(out_affine[3], [0, 0, 0, 1])
    result = Scan(
        hu=out, affine=out_affine, slice_ids=[str(k) for k in range(10)], spacing=(5.0, 1.0, 1.0)
    )
    assert result.shear_deg == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(result.slice_normal, scan.slice_normal)

    np.testing.assert_allclose(weighted_centroid(vol, affine), centre, atol=0.2)
    np.testing.assert_allclose(weighted_centroid(out, out_affine), centre, atol=1.0)
    # Along the (now orthogonal) slice axis the sphere stays put in-plane.
    per_slab = in_plane_centroids(out)
    assert len(per_slab) >= 3
    assert np.ptp(per_slab, axis=0).max() < 0.5


def test_untilted_5mm_series_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 3000, size=(12, 16, 20), dtype=np.int16)
    # An oblique but untilted orientation: the slice step is along the normal.
    rot = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, 2] = rot @ [0.7, 0, 0]
    affine[:3, 1] = rot @ [0, 0.7, 0]
    affine[:3, 0] = rot @ [0, 0, 5.0]
    affine[:3, 3] = [-90.5, 12.25, -30.0]
    out, out_affine = reslice(vol, affine, 5.0)
    np.testing.assert_array_equal(out, vol)
    np.testing.assert_allclose(out_affine, affine, atol=1e-9)


def test_thin_slices_are_averaged_into_slabs() -> None:
    # A ramp along z: slice k of a 1 mm series holds 10 * k.
    vol = (10.0 * np.arange(20, dtype=np.float32))[:, None, None] * np.ones((1, 3, 4), np.float32)
    affine = tilted_affine(0.0, 1.0)
    out, out_affine = reslice(vol, affine, 5.0)
    assert out.dtype == np.float32 and out.shape == (4, 3, 4)
    # slabs hold slices 0-4, 5-9, ...: means 20, 70, 120, 170
    np.testing.assert_array_equal(out[:, 0, 0], [20.0, 70.0, 120.0, 170.0])
    # ... and each slab sits at the centre of its slices, so the ramp is preserved
    slab_z = out_affine[2, 3] + 5.0 * np.arange(4)
    np.testing.assert_allclose(out[:, 0, 0], 10.0 * slab_z)


def test_int16_is_rounded_and_preserved() -> None:
    vol = np.repeat(np.array([0, 1, 0, 0, 0, 3, 3, 3, 3, 4], np.int16), 4).reshape(10, 2, 2)
    out, _ = reslice(vol, tilted_affine(0.0, 1.0), 5.0)
    assert out.dtype == np.int16
    as_float, _ = reslice(vol.astype(np.float32), tilted_affine(0.0, 1.0), 5.0)
    np.testing.assert_array_equal(out, np.rint(as_float).astype(np.int16))
    np.testing.assert_array_equal(out[:, 0, 0], [0, 3])  # means 0.2 and 3.2


def test_thick_slices_are_interpolated() -> None:
    vol = (10.0 * np.arange(6, dtype=np.float32))[:, None, None] * np.ones((1, 2, 2), np.float32)
    affine = tilted_affine(0.0, 10.0)  # slice k at z = 10 k, value = z
    out, out_affine = reslice(vol, affine, 5.0)
    slab_z = out_affine[2, 3] + 5.0 * np.arange(out.shape[0])
    # linear in the interior, clamped to the end slices beyond them
    np.testing.assert_allclose(out[:, 0, 0], np.clip(slab_z, 0.0, 50.0), atol=1e-4)
    assert slab_z[0] < 0 and slab_z[-1] > 50  # covers each thick slice's full extent


def test_gap_from_missing_slices_is_interpolated() -> None:
    z = np.r_[0:10, 20:30].astype(np.float64)  # 1 mm slices, 10 missing in the middle
    vol = (3.0 * z.astype(np.float32))[:, None, None] * np.ones((1, 2, 2), np.float32)
    affine = tilted_affine(0.0, 1.0)
    origins = np.stack([np.full_like(z, -32.0), np.full_like(z, -32.0), z], axis=1)
    out, out_affine = reslice(vol, affine, 5.0, slice_origins=origins)
    slab_z = out_affine[2, 3] + 5.0 * np.arange(out.shape[0])
    assert out.shape[0] == 6
    # every slab, averaged or gap-filled, reproduces the linear ramp at its centre
    np.testing.assert_allclose(out[:, 0, 0], 3.0 * slab_z, atol=1e-4)


def test_slice_order_does_not_matter() -> None:
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(16, 8, 8)).astype(np.float32)
    affine = tilted_affine(15.0, 1.25)
    want, want_affine = reslice(vol, affine, 5.0)
    flipped = affine.copy()
    flipped[:3, 3] = affine[:3, 3] + 15 * affine[:3, 0]
    flipped[:3, 0] = -affine[:3, 0]
    got, got_affine = reslice(vol[::-1], flipped, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-9)


def test_single_slice() -> None:
    vol = np.arange(6, dtype=np.int16).reshape(1, 2, 3)
    out, out_affine = reslice(vol, tilted_affine(0.0, 1.0), 5.0)
    np.testing.assert_array_equal(out, vol)
    np.testing.assert_allclose(out_affine[:3, 0], [0, 0, 5.0])


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="S, H, W"):
        reslice(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="thickness"):
        reslice(np.zeros((2, 4, 4)), tilted_affine(0, 1), 0.0)
    with pytest.raises(ValueError, match="same plane"):
        reslice(np.zeros((2, 4, 4)), tilted_affine(0, 0.0), 5.0)


def test_reslice_scan() -> None:
    affine = tilted_affine(20.0, 0.625)
    vol = sphere_series(affine, (40, 24, 24), np.array([0.0, -20.0, 10.0]), radius=5.0)
    scan = Scan(
        hu=vol,
        affine=affine,
        slice_ids=[f"1.2.3.{k}" for k in range(40)],
        spacing=(0.625, 1.0, 1.0),
        patient_id="p1",
        slice_thickness_mm=0.625,
        metadata={"kvp": 120},
        warnings=["gantry tilt 20 deg"],
    )
    out = reslice_scan(scan, 5.0)
    assert out is not scan and out.n_slices == 5
    assert out.slice_ids == [f"slab-{j:03d}" for j in range(5)]
    assert out.spacing == (5.0, 1.0, 1.0)
    assert out.slice_thickness_mm == 5.0
    assert out.metadata == {"kvp": 120, "resliced_from": (0.625, 1.0, 1.0)}
    assert out.warnings == scan.warnings and out.warnings is not scan.warnings
    assert out.patient_id == "p1"
    assert out.shear_deg == pytest.approx(0.0, abs=1e-6)
    # the input is untouched
    assert scan.n_slices == 40 and scan.metadata == {"kvp": 120}


def test_reslice_scan_respects_gaps_in_slice_positions() -> None:
    # The DICOM reader records each slice's distance along the normal from slice 0 in
    # metadata["slice_positions_mm"]; its affine holds only the regular step. Drop 12
    # slices of a tilted series through the sphere: the positions keep it in place.
    affine = tilted_affine(20.0, 0.625)
    centre = np.array([2.0, 3.0, 2.0])
    full = sphere_series(affine, (80, 64, 64), centre, radius=8.0)
    kept = [k for k in range(80) if not 20 <= k < 32]
    scan = Scan(
        hu=full[kept],
        affine=affine,
        slice_ids=[str(k) for k in kept],
        spacing=(0.625, 1.0, 1.0),
        metadata={"slice_positions_mm": [0.625 * k for k in kept]},
    )
    out = reslice_scan(scan, 5.0)
    assert out.n_slices == 10
    np.testing.assert_allclose(weighted_centroid(out.hu, out.affine), centre, atol=1.0)
    assert out.metadata["slice_positions_mm"] == [5.0 * j for j in range(10)]
    # Without the positions the gap is spread over the series and the sphere moves.
    del scan.metadata["slice_positions_mm"]
    wrong = reslice_scan(scan, 5.0)
    assert np.abs(weighted_centroid(wrong.hu, wrong.affine) - centre).max() > 3.0


def test_slice_far_away_is_refused_before_allocating() -> None:
    """Ten slices 1 mm apart and one at 1 km would ask for 200,000 slabs."""
    vol = np.zeros((11, 8, 8), dtype=np.int16)
    origins = np.zeros((11, 3))
    origins[:10, 0] = np.arange(10.0)  # along the slice normal of an identity affine
    origins[10, 0] = 1e6
    affine = np.eye(4)
    with pytest.raises(ValueError, match=r"slices span 1000000 mm .* more than any body"):
        reslice(vol, affine, 5.0, slice_origins=origins)


def test_slab_thickness_too_small_for_the_span_is_refused() -> None:
    vol = np.zeros((40, 8, 8), dtype=np.int16)
    affine = np.diag([5.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="slab thickness is too small"):
        reslice(vol, affine, 0.0001)


def test_slab_plan_is_what_reslice_makes_from_the_positions_alone() -> None:
    """A manifest lists a series' slabs, and gives each its slices' labels, from headers."""
    from ichscan.preprocess.reslice import is_thinner, slab_plan

    z = np.r_[0:10, 20:30].astype(np.float64)  # 1 mm slices with a 10 mm gap
    n, slab = slab_plan(z[::-1] + 40.0, 5.0)  # any origin, any order
    origins = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    out, _ = reslice(
        np.zeros((len(z), 2, 2), np.float32), tilted_affine(0.0, 1.0), 5.0, slice_origins=origins
    )
    assert n == out.shape[0] == 6
    assert slab is not None and slab[::-1].tolist() == [0] * 5 + [1] * 5 + [4] * 5 + [5] * 5
    assert slab_plan(np.arange(6) * 5.0, 5.0) == (6, None)  # nothing to average
    assert is_thinner(0.625, 5.0) and not is_thinner(4.8, 5.0) and not is_thinner(None, 5.0)
