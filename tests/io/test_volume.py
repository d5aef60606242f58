"""Decoding a discovered series into one HU volume: a slice that cannot be decoded costs
that slice, not the series; a volume too large to allocate is refused first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from ichscan.errors import InputError
from ichscan.infer.predictor import iter_scans
from ichscan.io import volume
from ichscan.io.dicom_write import write_ct_series
from ichscan.io.series import discover
from ichscan.io.volume import load_series
from ichscan.scan import Scan


def _corrupt_rle(path: Path) -> None:
    """Keep the RLE header (discovery passes) but cut the segments short (decoding fails)."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:80]])
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_undecodable_slice_is_left_out_and_named(
    tmp_path: Path,
    phantom_volume: np.ndarray,
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(volume, "MIN_SLICES_FOR_POOL", 2)  # take the worker-pool path too
    paths = write_ct_series(phantom_volume, tmp_path, compression="rle")
    _corrupt_rle(paths[5])
    found = discover(tmp_path)
    assert not found.bad_files  # its header is fine: only decoding finds the problem
    scan = load_series(found.selected, workers=workers)
    assert scan.n_slices == len(paths) - 1
    expected = np.delete(np.clip(phantom_volume, -1024, None), 5, axis=0)
    np.testing.assert_array_equal(scan.hu, expected)
    assert [p for p, _ in scan.metadata["unreadable_slices"]] == [str(paths[5])]
    assert any(str(paths[5]) in w and "cannot decode" in w for w in scan.warnings)
    assert not any("\n" in w for w in scan.warnings), "one line each, whatever the decoders say"
    # The geometry is that of the slices kept: one 10 mm gap where slice 5 was.
    assert np.diff(scan.metadata["slice_positions_mm"]).max() == pytest.approx(10.0)


def test_predict_inputs_report_the_undecodable_slice(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    paths = write_ct_series(phantom_volume, tmp_path, compression="rle")
    _corrupt_rle(paths[2])
    items = list(iter_scans(tmp_path, workers=1))
    scans = [i for i in items if isinstance(i, Scan)]
    failures = [i for i in items if not isinstance(i, Scan)]
    assert len(scans) == 1 and scans[0].n_slices == len(paths) - 1
    assert [(label, type(err)) for label, err in failures] == [(str(paths[2]), InputError)]


def test_series_of_only_undecodable_slices_is_one_error(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    paths = write_ct_series(phantom_volume[:3], tmp_path, compression="rle")
    for p in paths:
        _corrupt_rle(p)
    with pytest.raises(InputError, match="no slice of the series could be read"):
        load_series(discover(tmp_path).selected, workers=1)


def test_volume_too_large_is_refused_before_allocating(
    tmp_path: Path, phantom_volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_ct_series(phantom_volume, tmp_path)
    monkeypatch.setattr(volume, "MAX_VOLUME_BYTES", 64 * 64 * 2 * 4)
    with pytest.raises(InputError, match=r"12 slices of 64x64 would take .* more than"):
        load_series(discover(tmp_path).selected, workers=1)
