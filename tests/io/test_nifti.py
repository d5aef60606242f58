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
from ichscan.io.nifti import (
    AIR_HU,
    check_nifti_header,
    nonfinite_to_air,
    open_nifti,
    read_nifti,
    write_nifti,
)
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


def test_float64_volume_within_the_voxel_cap_is_refused_by_its_bytes(tmp_path: Path) -> None:
    """1024 x 1024 x 512 float64 is within MAX_VOXELS but 4 GiB once read (a 4 MB gzip of
    zeros): refused from the header."""
    path = tmp_path / "f64.nii.gz"
    raw = bytearray(_save(tmp_path / "f64src.nii", _volume().astype(np.float64)).read_bytes())
    struct.pack_into("<8h", raw, DIM, 3, 1024, 1024, 512, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(raw[:352]) + bytes(1000)))
    with pytest.raises(InputError, match=r"voxels of 8 bytes \(4\.0 GiB\), more than the 2 GiB"):
        read_nifti(path)


def test_4d_header_claiming_huge_dims_is_refused_before_reading(tmp_path: Path) -> None:
    # One volume in a 4-D file: dropping the 4th axis must not read the 16 GB first.
    path = _patched(
        tmp_path / "huge4d.nii", [("<8h", DIM, (4, 2000, 2000, 2000, 1, 1, 1, 1))], tail=bytes(1000)
    )
    with pytest.raises(InputError, match="header declares 2000x2000x2000x1 voxels"):
        read_nifti(path)


@pytest.mark.parametrize(
    ("edits", "problem"),
    [
        ([("<hh", QFORM_CODE, (0, 1)), ("<12f", SROW, (np.nan,) * 12)], "affine is not finite"),
        ([("<hh", QFORM_CODE, (0, 1)), ("<12f", SROW, (0.0,) * 12)], "affine is singular"),
        ([("<8h", DIM, (3, 2000, 2000, 2000, 1, 1, 1, 1))], "header declares 2000x2000x2000"),
        ([("<8h", DIM, (2, 8, 8, 1, 1, 1, 1, 1))], "expected one 3-D volume"),
        ([("<8h", DIM, (4, 8, 8, 2, 2, 1, 1, 1))], "expected one 3-D volume"),
        ([("<8h", DIM, (3, -5, 8, 4, 1, 1, 1, 1))], "negative dimension: -5x8x4"),
        ([("<8h", DIM, (3, -8, -8, 4, 1, 1, 1, 1))], "negative dimension: -8x-8x4"),
        ([("<8h", DIM, (3, 8, 0, 4, 1, 1, 1, 1))], "8x0x4 holds no voxels"),
    ],
)
def test_header_checks_are_public_and_read_no_voxel(
    tmp_path: Path, edits: list[tuple[str, int, tuple]], problem: str
) -> None:
    # Header only: the file holds no voxel data at all, so any read would fail otherwise.
    path = _patched(tmp_path / "bad.nii", edits, tail=b"")
    with pytest.raises(InputError, match=problem) as info:
        open_nifti(path)
    assert info.value.path == str(path)
    img = nib.load(str(path))
    with pytest.raises(InputError, match=problem):
        check_nifti_header(img, path)


def test_open_nifti_gives_the_checked_header(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.nii.gz", _volume())
    assert open_nifti(path).shape == (8, 8, 4)
    for kind, problem in [
        (np.complex64, "holds complex numbers"),
        ([("R", "u1"), ("G", "u1"), ("B", "u1")], "not a greyscale intensity"),
    ]:
        bad = _save(tmp_path / "bad.nii.gz", np.zeros((8, 8, 4), dtype=kind))
        with pytest.raises(InputError, match=problem):
            open_nifti(bad)
    with pytest.raises(InputError, match="file not found"):
        open_nifti(tmp_path / "gone.nii")
    (tmp_path / "junk.nii.gz").write_bytes(b"nope")
    with pytest.raises(InputError, match="not a readable NIfTI file"):
        open_nifti(tmp_path / "junk.nii.gz")


def test_nonfinite_to_air_counts_what_it_replaced() -> None:
    plane = np.array([[1.5, np.nan], [-np.inf, 3.0]], dtype=np.float32)
    out, n_bad = nonfinite_to_air(plane)
    assert n_bad == 2 and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.5, AIR_HU], [AIR_HU, 3.0]])
    same, none = nonfinite_to_air(out)
    assert none == 0 and same is out


def test_a_plain_nii_shorter_than_its_header_says_is_refused_unread(tmp_path: Path) -> None:
    raw = _save(tmp_path / "a.nii", _volume()).read_bytes()
    path = tmp_path / "cut.nii"
    path.write_bytes(raw[: 352 + 100])
    with pytest.raises(InputError, match="truncated: 100 of 512 voxel data bytes"):
        open_nifti(path)
    path.write_bytes(raw + bytes(8))  # trailing bytes are harmless
    assert open_nifti(path).shape == (8, 8, 4)


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


def test_one_volume_in_a_4d_file_reads_as_the_3d_volume(tmp_path: Path) -> None:
    flat = read_nifti(_save(tmp_path / "a.nii.gz", _volume()))
    four = read_nifti(_save(tmp_path / "b.nii.gz", _volume()[..., np.newaxis]))
    np.testing.assert_array_equal(four.hu, flat.hu)
    np.testing.assert_array_equal(four.affine, flat.affine)
    assert four.spacing == flat.spacing
