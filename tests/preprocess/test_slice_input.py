"""The fused DICOM → model-input path must equal the step-by-step path it replaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ichscan.errors import InputError
from ichscan.io.dicom import read_slice_hu
from ichscan.io.dicom_write import write_ct_series
from ichscan.preprocess.resize import resize_slice
from ichscan.preprocess.slice_input import dicom_files_to_inputs, dicom_to_input
from ichscan.preprocess.window import stack_windows

WINDOWS = ["brain", "subdural", "bone"]


def _reference(path: Path, windows: list[str], size: int | None) -> np.ndarray:
    hu, _ = read_slice_hu(path)
    stacked = stack_windows(hu, windows)
    return stacked if size is None else resize_slice(stacked, size)


def test_real_rsna_slices_match_reference_exactly_at_full_size(rsna_dicom_dir: Path) -> None:
    for path in sorted((rsna_dicom_dir / "stage_2_train").glob("*.dcm")):
        fast = dicom_to_input(path, WINDOWS, size=None)
        np.testing.assert_array_equal(fast, _reference(path, WINDOWS, None))


def test_real_rsna_slices_resized_match_box_average(rsna_dicom_dir: Path) -> None:
    for path in sorted((rsna_dicom_dir / "stage_2_train").glob("*.dcm")):
        fast = dicom_to_input(path, WINDOWS, size=256)
        full = _reference(path, WINDOWS, None).astype(np.float64)
        box = full.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
        assert fast.shape == (256, 256, 3) and fast.dtype == np.uint8
        assert np.abs(fast - box).max() <= 1.0


@pytest.mark.parametrize("windows", [["brain"], ["brain", "bone"], WINDOWS])
@pytest.mark.parametrize("storage", ["int16", "uint12"])
def test_channel_counts_and_storage(
    tmp_path: Path, phantom_volume: np.ndarray, windows: list[str], storage: str
) -> None:
    (path,) = write_ct_series(phantom_volume[5:6], tmp_path, storage=storage)
    fast = dicom_to_input(path, windows, size=None)
    assert fast.shape == (64, 64, len(windows))
    np.testing.assert_array_equal(fast, _reference(path, windows, None))


def test_non_integer_resize(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    (path,) = write_ct_series(phantom_volume[5:6], tmp_path)
    assert dicom_to_input(path, WINDOWS, size=50).shape == (50, 50, 3)


def test_sigmoid_mode(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    (path,) = write_ct_series(phantom_volume[5:6], tmp_path)
    hu, _ = read_slice_hu(path)
    expected = stack_windows(hu, WINDOWS, mode="sigmoid")
    np.testing.assert_array_equal(dicom_to_input(path, WINDOWS, None, "sigmoid"), expected)


def test_more_than_three_windows_is_refused(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    (path,) = write_ct_series(phantom_volume[5:6], tmp_path)
    with pytest.raises(ValueError, match="at most 3 windows"):
        dicom_to_input(path, [*WINDOWS, "soft_tissue"])


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_keeps_order_and_reports_bad_files(
    tmp_path: Path, phantom_volume: np.ndarray, workers: int
) -> None:
    paths = write_ct_series(phantom_volume, tmp_path)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"garbage" * 10)
    inputs = [*paths[:5], bad, *paths[5:]]
    results = list(dicom_files_to_inputs(inputs, WINDOWS, 32, workers=workers, chunksize=2))
    assert [r[0] for r in results] == [str(p) for p in inputs]
    assert isinstance(results[5][1], InputError) and "bad.dcm" in str(results[5][1])
    for path, out in results[:5] + results[6:]:
        np.testing.assert_array_equal(out, dicom_to_input(path, WINDOWS, 32))
