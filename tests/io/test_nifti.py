"""NIfTI input: a volume whose header cannot describe a head CT (no usable affine, colour or
complex voxels, dimensions no scanner makes) is refused in one line naming the file, before
its voxels are read."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ichscan.errors import InputError
from ichscan.io.nifti import read_nifti, write_nifti
from ichscan.scan import Scan

AFFINE = np.diag([0.5, 0.5, 5.0, 1.0])
# Byte offsets in a NIfTI-1 header.
DIM, QFORM_CODE, SROW = 40, 252, 280


def _volume() -> np.ndarray:
    return (np.arange(8 * 8 * 4).reshape(8, 8, 4) % 50 - 1000).astype(np.int16)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _patched(path: Path, edits: list[tuple[str, int, tuple]], tail: bytes | None = None) -> Path:
    """A good plain .nii with header fields overwritten (struct format, offset, values)."""
    raw = bytearray(_save(path.with_name("src.nii"), _volume()).read_bytes())
    for fmt, offset, values in edits:
        struct.pack_into(fmt, raw, offset, *values)
    data = bytes(raw) if tail is None else bytes(raw[:352]) + tail
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _with_sform(path: Path, value: float) -> Path:
    # sform_code 1 (scanner), qform_code 0: the srow values are the only affine there is.
    return _patched(path, [("<hh", QFORM_CODE, (0, 1)), ("<12f", SROW, (value,) * 12)])


def test_good_volume_reads(tmp_path: Path) -> None:
    scan = read_nifti(_save(tmp_path / "a.nii.gz", _volume()))
    assert scan.shape == (4, 8, 8)
    assert scan.spacing == pytest.approx((5.0, 0.5, 0.5))
    assert scan.warnings == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [(np.nan, "affine is not finite"), (np.inf, "affine is not finite"), (0.0, "is singular")],
)
def test_unusable_affine_is_refused(tmp_path: Path, value: float, problem: str) -> None:
    path = _with_sform(tmp_path / "bad.nii", value)
    with pytest.raises(InputError, match=problem) as info:
        read_nifti(path)
    assert info.value.path == str(path)


def test_zero_pixdim_without_any_affine_still_reads(tmp_path: Path) -> None:
    # No sform or qform and zero pixdim: nibabel falls back to 1 mm voxels, a usable grid.
    path = _patched(tmp_path / "a.nii", [("<hh", QFORM_CODE, (0, 0)), ("<8f", 76, (0.0,) * 8)])
    assert read_nifti(path).shape == (4, 8, 8)


def test_rgb_voxels_are_refused(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = _save(tmp_path / "rgb.nii.gz", rgb)
    with pytest.raises(InputError, match="voxel type RGB24 is not a greyscale intensity"):
        read_nifti(path)


def test_complex_voxels_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "c.nii.gz", _volume().astype(np.complex64))
    with pytest.raises(InputError, match="voxel type COMPLEX64 holds complex numbers, not HU"):
        read_nifti(path)


def test_some_nan_voxels_become_air_and_say_so(tmp_path: Path) -> None:
    data = _volume().astype(np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    scan = read_nifti(_save(tmp_path / "n.nii.gz", data))
    assert scan.hu.dtype == np.int16
    assert int(scan.hu.min()) == -1024
    assert "2 voxel(s) are NaN or infinite; read as air (-1024 HU)" in scan.warnings


def test_all_nan_voxels_are_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "n.nii.gz", np.full((8, 8, 4), np.nan, np.float32))
    with pytest.raises(InputError, match="no voxel holds a number"):
        read_nifti(path)


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_header_claiming_huge_dims_is_refused_before_reading(tmp_path: Path, name: str) -> None:
    # 2000^3 int16 is 16 GB; the file holds a header and 1000 zero bytes.
    path = _patched(
        tmp_path / name, [("<8h", DIM, (3, 2000, 2000, 2000, 1, 1, 1, 1))], tail=bytes(1000)
    )
    with pytest.raises(InputError) as info:
        read_nifti(path)
    message = str(info.value)
    assert message.startswith(f"{path}: header declares 2000x2000x2000 voxels")
    assert "more than a head CT holds" in message


def test_truncated_volume_message_is_one_line(tmp_path: Path) -> None:
    raw = _save(tmp_path / "a.nii", _volume()).read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: 352 + 100])
    with pytest.raises(InputError, match="cannot read NIfTI voxel data") as info:
        read_nifti(path)
    assert "\n" not in str(info.value)
    assert "()" not in str(info.value)


def test_write_refuses_a_non_finite_affine(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 3] = np.nan
    scan = Scan(
        hu=np.zeros((2, 4, 4), np.int16),
        affine=affine,
        slice_ids=["a", "b"],
        spacing=(1.0, 1.0, 1.0),
        source="series_ipp_nan",
    )
    with pytest.raises(InputError, match=r"series_ipp_nan: .*not finite"):
        write_nifti(scan, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
