"""`ichscan.load`: every input kind becomes the same Scan, and bad input says what is wrong."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import ichscan
from ichscan.errors import InputError
from ichscan.io.archive import ZipLimits
from ichscan.io.dicom_write import write_ct_series


def test_folder_gives_hu_volume_in_spatial_order(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    write_ct_series(phantom_volume, tmp_path, file_names="shuffled", pixel_spacing=(3.6, 3.6))
    scan = ichscan.load(tmp_path)
    np.testing.assert_array_equal(scan.hu, np.clip(phantom_volume, -1024, None))
    assert scan.spacing == pytest.approx((5.0, 3.6, 3.6))
    assert scan.windowed is None
    assert scan.n_slices == len(scan.slice_ids) == phantom_volume.shape[0]
    # Affine: voxel (k, i, j) → LPS; rows run along +y, columns along +x, slices along +z.
    expected = np.array([[0, 0, 3.6], [0, 3.6, 0], [5.0, 0, 0]])
    np.testing.assert_allclose(scan.affine[:3, :3], expected, atol=1e-6)


def test_single_file(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    paths = write_ct_series(phantom_volume[5:6], tmp_path)
    scan = ichscan.load(paths[0])
    assert scan.shape == (1, 64, 64)
    assert scan.slice_ids == [paths[0].stem]


def test_real_rsna_file(rsna_dicom_dir: Path) -> None:
    scan = ichscan.load(rsna_dicom_dir / "stage_2_train" / "ID_0fe31b044.dcm")
    assert scan.slice_ids == ["ID_0fe31b044"]
    assert scan.shape == (1, 512, 512)


def test_real_rsna_folder_of_five_studies_warns(rsna_dicom_dir: Path) -> None:
    scan = ichscan.load(rsna_dicom_dir)
    assert any("holds 5 studies" in w for w in scan.warnings)


def test_zip_of_dicom(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    paths = write_ct_series(phantom_volume, tmp_path / "series")
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, f"study/{p.name}")
    scan = ichscan.load(archive)
    np.testing.assert_array_equal(scan.hu, np.clip(phantom_volume, -1024, None))


def test_zip_with_path_traversal_is_refused(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    paths = write_ct_series(phantom_volume[:2], tmp_path / "series")
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(paths[0], "ok.dcm")
        zf.write(paths[1], "../../etc/evil.dcm")
    with pytest.raises(InputError, match="points outside the archive"):
        ichscan.load(archive)


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\x00" * (20 * 1024 * 1024))
    with pytest.raises(InputError, match="zip bomb"):
        ichscan.load(archive)


def test_zip_total_size_limit(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    paths = write_ct_series(phantom_volume, tmp_path / "series")
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in paths:
            zf.write(p, p.name)
    with pytest.raises(InputError, match="over the"):
        ichscan.load(archive, zip_limits=ZipLimits(max_total_bytes=10_000))


def test_corrupt_zip(tmp_path: Path) -> None:
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(InputError, match=r"broken\.zip"):
        ichscan.load(archive)


def test_folder_with_bad_files_loads_good_ones_and_lists_bad(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    paths = write_ct_series(phantom_volume, tmp_path)
    paths[0].write_bytes(paths[0].read_bytes()[:200])  # truncated inside the header
    (tmp_path / "random.bin").write_bytes(b"\x07" * 1000)
    scan = ichscan.load(tmp_path)
    assert scan.n_slices == phantom_volume.shape[0] - 1
    skipped = [w for w in scan.warnings if w.startswith("skipped ")]
    assert len(skipped) == 2
    assert any(paths[0].name in w for w in skipped)


def test_folder_of_only_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"nope" * 100)
    with pytest.raises(InputError, match="no readable CT series"):
        ichscan.load(tmp_path)


def test_non_ct_series_is_refused(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    write_ct_series(phantom_volume, tmp_path, modality="MR")
    with pytest.raises(InputError, match="modality is MR"):
        ichscan.load(tmp_path)


# --- NIfTI -----------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_anatomy(tmp_path: Path) -> None:
    """A bright voxel placed at a known patient position lands at the right RAS point in the
    written NIfTI, and reading it back gives the same Scan geometry."""
    vol = np.full((10, 20, 16), -1000, np.int16)
    vol[7, 3, 12] = 1000  # slice 7, row 3, column 12
    paths = write_ct_series(
        vol,
        tmp_path / "dcm",
        pixel_spacing=(0.8, 0.7),
        slice_spacing=2.0,
        origin=(-50.0, -60.0, 10.0),
    )
    scan = ichscan.load(tmp_path / "dcm")
    assert len(paths) == 10
    lps = np.array([-50.0 + 12 * 0.7, -60.0 + 3 * 0.8, 10.0 + 7 * 2.0])
    np.testing.assert_allclose((scan.affine @ [7, 3, 12, 1])[:3], lps, atol=1e-6)

    out = ichscan.write_nifti(scan, tmp_path / "scan.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    data = np.asanyarray(img.dataobj)
    vox = np.argwhere(data == 1000)[0]
    ras = (img.affine @ [*vox, 1])[:3]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")

    back = ichscan.load(out)
    np.testing.assert_array_equal(back.hu, scan.hu)
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-5)


def test_nifti_in_ras_orientation_reads_as_axial(tmp_path: Path) -> None:
    """A NIfTI written by another tool in RAS voxel order: the top of each slice is anterior."""
    data = np.full((20, 24, 8), -1000, np.int16)  # x (R), y (A), z (S)
    data[10, 22, 4] = 500  # anterior
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    nib.save(img, tmp_path / "ras.nii")
    scan = ichscan.load(tmp_path / "ras.nii")
    assert scan.shape == (8, 24, 20)
    k, i, _ = np.argwhere(scan.hu == 500)[0]
    assert k == 4 and i == 24 - 1 - 22  # anterior is near row 0
    assert scan.spacing == pytest.approx((3.0, 1.0, 1.0))


def test_nifti_with_four_dimensions(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), tmp_path / "4d.nii")
    with pytest.raises(InputError, match="4 dimensions"):
        ichscan.load(tmp_path / "4d.nii")


def test_corrupt_nifti(tmp_path: Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match=r"bad\.nii\.gz"):
        ichscan.load(tmp_path / "bad.nii.gz")


# --- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_png_any_mode_becomes_one_windowed_grey_slice(tmp_path: Path, mode: str) -> None:
    grey = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))
    img = Image.fromarray(grey).convert(mode)
    img.save(tmp_path / "slice.png")
    scan = ichscan.load(tmp_path / "slice.png", image_window="brain")
    assert scan.shape == (1, 30, 50)
    assert scan.windowed == "brain"
    assert scan.hu.dtype == np.uint8
    assert np.abs(scan.hu[0].astype(int) - grey).max() <= 2


def test_jpeg_slice(tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 60), 128, np.uint8)).save(tmp_path / "x.jpg")
    scan = ichscan.load(tmp_path / "x.jpg")
    assert scan.windowed == "unknown" and scan.shape == (1, 40, 60)


def test_real_head_ct_pngs_all_load(head_ct_dir: Path) -> None:
    images = sorted((head_ct_dir / "images").glob("*.png"))
    assert len(images) == 150
    for p in images:
        scan = ichscan.load(p, image_window="brain")
        assert scan.n_slices == 1 and scan.hu.dtype == np.uint8


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        ichscan.load(tmp_path / "x.png")


def test_folder_of_two_patients_says_two_patients(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    for patient in ("PA", "PB"):
        write_ct_series(phantom_volume, tmp_path / patient, patient_id=patient)
    scan = ichscan.load(tmp_path)
    (warning,) = [w for w in scan.warnings if "holds" in w]
    assert "holds 2 studies of 2 patients; loaded patient P" in warning


def test_two_patients_sharing_one_series_uid_are_not_one_volume(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    for patient, z in (("PA", 0.0), ("PB", 500.0)):
        write_ct_series(
            phantom_volume, tmp_path, patient_id=patient, series_uid="1.2.3.4", origin=(0, 0, z)
        )
    scan = ichscan.load(tmp_path)
    assert scan.n_slices == phantom_volume.shape[0]
    assert any("holds 2 studies of 2 patients" in w for w in scan.warnings)
    assert any("SeriesInstanceUID 1.2.3.4 is shared by 2" in w for w in scan.warnings)
    assert scan.metadata["series_uid_shared"] and scan.metadata["mixed_input"]
