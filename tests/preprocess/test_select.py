from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.preprocess.select import middle_slices, select_scan, select_slices
from ichscan.scan import Scan


def test_middle_slices_examples() -> None:
    np.testing.assert_array_equal(middle_slices(40), np.arange(6, 34))
    np.testing.assert_array_equal(middle_slices(41, 28), np.arange(6, 34))
    np.testing.assert_array_equal(middle_slices(10, None), np.arange(10))
    np.testing.assert_array_equal(middle_slices(10, 28), np.arange(10))
    assert middle_slices(0, 5).size == 0
    assert middle_slices(40).dtype == np.int64


@settings(max_examples=100, deadline=None)
@given(n_total=st.integers(0, 300), n=st.one_of(st.none(), st.integers(1, 300)))
def test_middle_slices_properties(n_total: int, n: int | None) -> None:
    idx = middle_slices(n_total, n)
    want = n_total if n is None else min(n, n_total)
    assert idx.size == want
    if want:
        np.testing.assert_array_equal(np.diff(idx), 1)
        before, after = int(idx[0]), n_total - 1 - int(idx[-1])
        assert 0 <= after - before <= 1  # centred; an odd surplus slice goes last


@pytest.mark.parametrize("n", [0, -3])
def test_bad_count(n: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        middle_slices(10, n)


def test_select_slices_is_a_view() -> None:
    vol = np.arange(10 * 2 * 2).reshape(10, 2, 2)
    sub = select_slices(vol, 4)
    np.testing.assert_array_equal(sub, vol[3:7])
    assert np.shares_memory(sub, vol)


def test_select_scan_updates_ids_and_origin() -> None:
    affine = np.array([[0.0, 0, 0.5, -100], [0.3, 0.5, 0, -120], [2.5, 0, 0, 40], [0, 0, 0, 1]])
    scan = Scan(
        hu=np.arange(12 * 3 * 4, dtype=np.int16).reshape(12, 3, 4),
        affine=affine,
        slice_ids=[f"s{k}" for k in range(12)],
        spacing=(2.5, 0.5, 0.5),
        metadata={"a": 1},
        warnings=["w"],
    )
    sub = select_scan(scan, 5)
    assert sub.slice_ids == ["s3", "s4", "s5", "s6", "s7"]
    np.testing.assert_array_equal(sub.hu, scan.hu[3:8])
    # voxel (k, i, j) of the subset is voxel (k + 3, i, j) of the original
    for voxel in ([0, 0, 0], [4, 2, 3]):
        k, i, j = voxel
        np.testing.assert_allclose(sub.affine @ [k, i, j, 1], scan.affine @ [k + 3, i, j, 1])
    assert sub.metadata == {"a": 1, "selected_slices": (3, 8)}
    assert sub.warnings == ["w"] and sub.spacing == scan.spacing
    # the original is untouched
    assert scan.metadata == {"a": 1} and scan.n_slices == 12
    np.testing.assert_array_equal(scan.affine, affine)
    everything = select_scan(scan, None)
    assert everything.slice_ids == scan.slice_ids
    np.testing.assert_array_equal(everything.affine, affine)


def test_select_scan_follows_slice_positions_across_a_gap() -> None:
    # 1 mm slices at z = 0..4 and 10..14 (5 missing); the affine holds the 1 mm step.
    z = [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    affine = np.eye(4)[[2, 1, 0, 3]]  # slice step +z, rows +y, columns +x
    scan = Scan(
        hu=np.zeros((10, 2, 2), np.int16),
        affine=affine,
        slice_ids=[str(v) for v in z],
        spacing=(1.0, 1.0, 1.0),
        metadata={"slice_positions_mm": [float(v) for v in z], "files": [f"f{v}" for v in z]},
    )
    sub = select_scan(scan, 4)  # slices 3..6: z = 3, 4, 10, 11
    np.testing.assert_allclose(sub.affine[:3, 3], [0.0, 0.0, 3.0])
    assert sub.metadata["slice_positions_mm"] == [0.0, 1.0, 7.0, 8.0]
    assert sub.metadata["files"] == ["f3", "f4", "f10", "f11"]
    gap_first = select_scan(scan, 2)  # slices 4..5: z = 4, 10
    np.testing.assert_allclose(gap_first.affine[:3, 3], [0.0, 0.0, 4.0])
    assert gap_first.metadata["slice_positions_mm"] == [0.0, 6.0]
