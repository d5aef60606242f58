"""The DICOM writer produces valid series with exactly the quirks it is asked for, so reader
tests built on it exercise what they claim to."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from ichscan.io.dicom_write import (
    COMPRESSIONS,
    CT_IMAGE_STORAGE,
    write_ct_series,
    write_dataset_without_pixels,
)

EXPECTED_SYNTAX = {
    "none": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-lossless": JPEGLosslessSV1,
}
STORAGE_RANGE = {"int16": (-32768, 32767), "uint12": (0, 4095)}


def _volume(shape: tuple[int, int, int] = (6, 64, 64), seed: int = 0) -> np.ndarray:
    """Noisy HU over the full 12-bit CT range, with a padded (-2000 HU) border like the area
    outside a scanner's circular field of view."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    hu[:, :4, :] = -2000
    return hu


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    # Decode with pylibjpeg where it can, so GDCM-written files are not checked by GDCM.
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
    return ds.pixel_array


def test_every_compression_is_in_the_table() -> None:
    assert set(COMPRESSIONS) == set(EXPECTED_SYNTAX)


@pytest.mark.parametrize("storage", ["int16", "uint12"])
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compression_round_trips_stored_values_exactly(
    tmp_path: Path, compression: str, storage: str
) -> None:
    hu = _volume()
    paths = write_ct_series(hu, tmp_path, compression=compression, storage=storage)
    for k, ds in enumerate(_read(paths)):
        assert ds.file_meta.TransferSyntaxUID == EXPECTED_SYNTAX[compression]
        arr = _pixels(ds)
        expected = np.clip(hu[k].astype(np.int32) + 1024, *STORAGE_RANGE[storage])
        assert arr.dtype == (np.int16 if storage == "int16" else np.uint16)
        np.testing.assert_array_equal(arr, expected)


def test_stored_values_rescale_back_to_hu(tmp_path: Path) -> None:
    hu = _volume()
    ds = _read(write_ct_series(hu, tmp_path))[2]
    assert ds.RescaleType == "HU"
    rescaled = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(rescaled, hu[2])


def test_non_unit_slope_is_applied_on_write(tmp_path: Path) -> None:
    hu = _volume().astype(np.float32) + 0.25
    ds = _read(write_ct_series(hu, tmp_path, rescale_slope=0.5, rescale_intercept=-1000.0))[0]
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == -1000.0
    rescaled = ds.pixel_array * 0.5 - 1000.0
    assert np.abs(rescaled - hu[0]).max() <= 0.25 + 1e-6


def test_without_rescale_tags_stored_values_are_hu(tmp_path: Path) -> None:
    hu = _volume()
    ds = _read(write_ct_series(hu, tmp_path, write_rescale=False))[0]
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds and "RescaleType" not in ds
    np.testing.assert_array_equal(ds.pixel_array, hu[0])


def test_files_are_valid_dicom_with_the_full_ct_header(tmp_path: Path) -> None:
    paths = write_ct_series(
        _volume(),
        tmp_path,
        patient_id="P42",
        series_number=3,
        series_description="Head 5mm",
        convolution_kernel="FC21",
    )
    # Strict reading fails on values that break their VR (overlong DS, bad UIDs...).
    with config.strict_reading():
        datasets = [pydicom.dcmread(p) for p in paths]
        for ds in datasets:
            for element in ds.iterall():
                _ = element.value
    first = datasets[0]
    assert paths[0].read_bytes()[128:132] == b"DICM"
    assert first.SOPClassUID == CT_IMAGE_STORAGE
    assert first.file_meta.MediaStorageSOPClassUID == first.SOPClassUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    for uid in (first.SOPInstanceUID, first.StudyInstanceUID, first.SeriesInstanceUID):
        assert UID(uid).is_valid
    assert UID(first.FrameOfReferenceUID).is_valid
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert first.PatientID == "P42" and first.SeriesNumber == 3
    assert first.Modality == "CT" and first.Manufacturer == "ichscan-synthetic"
    assert first.ConvolutionKernel == "FC21"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (first.Rows, first.Columns, first.SamplesPerPixel) == (64, 64, 1)
    assert (first.BitsAllocated, first.BitsStored, first.HighBit, first.PixelRepresentation) == (
        16,
        16,
        15,
        1,
    )
    assert (float(first.WindowCenter), float(first.WindowWidth)) == (40.0, 80.0)
    assert float(first.SliceThickness) == 5.0
    assert "SpacingBetweenSlices" not in first
    assert "PixelPaddingValue" not in first


def test_given_uids_are_used(tmp_path: Path) -> None:
    ds = _read(write_ct_series(_volume(), tmp_path, study_uid="1.2.3.4", series_uid="1.2.3.4.5"))[0]
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")


def test_positions_step_along_z_and_default_origin_centres_the_image(tmp_path: Path) -> None:
    paths = write_ct_series(_volume(), tmp_path, pixel_spacing=(0.5, 0.8), slice_spacing=2.5)
    datasets = _read(paths)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(np.diff(positions, axis=0), [[0.0, 0.0, 2.5]] * 5)
    assert positions[0, 2] == 0.0
    # Centre of the image: half the columns along x (column spacing), half the rows along y.
    centre = positions[0] + [31.5 * 0.8, 31.5 * 0.5, 0.0]
    np.testing.assert_allclose(centre, [0.0, 0.0, 0.0], atol=1e-9)
    assert [float(v) for v in datasets[0].PixelSpacing] == [0.5, 0.8]
    np.testing.assert_allclose([float(ds.SliceLocation) for ds in datasets], np.arange(6) * 2.5)


def test_explicit_origin_is_slice_zero_position(tmp_path: Path) -> None:
    ds = _read(write_ct_series(_volume(), tmp_path, origin=(-10.0, 20.0, -30.0)))[0]
    assert [float(v) for v in ds.ImagePositionPatient] == [-10.0, 20.0, -30.0]


def test_tilted_gantry_geometry(tmp_path: Path) -> None:
    tilt = 15.0
    datasets = _read(write_ct_series(_volume(), tmp_path, tilt_deg=tilt, slice_spacing=5.0))
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    np.testing.assert_allclose(iop, [1, 0, 0, 0, c, -s], atol=1e-12)
    assert float(datasets[0].GantryDetectorTilt) == tilt
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(normal, [0, s, c], atol=1e-12)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    steps = np.diff(positions, axis=0)
    # The table moves along z only, by more than the slice spacing ...
    np.testing.assert_allclose(steps[:, :2], 0.0, atol=1e-9)
    np.testing.assert_allclose(steps[:, 2], 5.0 / c, rtol=1e-9)
    # ... so that the planes are exactly slice_spacing apart along their normal.
    np.testing.assert_allclose(steps @ normal, 5.0, rtol=1e-9)


def test_monochrome1_mirrors_stored_values(tmp_path: Path) -> None:
    hu = _volume()
    plain = _read(write_ct_series(hu, tmp_path / "m2", storage="uint12"))[0].pixel_array
    inverted = _read(
        write_ct_series(hu, tmp_path / "m1", storage="uint12", photometric="MONOCHROME1")
    )[0]
    assert inverted.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(inverted.pixel_array, 4095 - plain.astype(np.int32))


def test_monochrome1_signed_storage_stays_in_range(tmp_path: Path) -> None:
    hu = _volume()
    plain = _read(write_ct_series(hu, tmp_path / "m2"))[0].pixel_array
    inverted = _read(write_ct_series(hu, tmp_path / "m1", photometric="MONOCHROME1"))[0]
    # Signed mirror: min + max - stored = -1 - stored.
    np.testing.assert_array_equal(inverted.pixel_array, -1 - plain.astype(np.int32))


def test_uint12_storage_tags_and_clipping(tmp_path: Path) -> None:
    hu = np.zeros((2, 8, 8), dtype=np.int16)
    hu[:, 0, 0] = -3000
    hu[:, 0, 1] = 4000
    ds = _read(write_ct_series(hu, tmp_path, storage="uint12"))[0]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    arr = ds.pixel_array
    assert arr.dtype == np.uint16
    assert (arr[0, 0], arr[0, 1], arr[1, 1]) == (0, 4095, 1024)


def test_uint16_storage_tags(tmp_path: Path) -> None:
    ds = _read(write_ct_series(_volume(), tmp_path, storage="uint16"))[0]
    assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 15, 0)
    assert ds.pixel_array.dtype == np.uint16


def test_padding_value_is_written_and_used_for_padded_voxels(tmp_path: Path) -> None:
    hu = _volume()
    ds = _read(write_ct_series(hu, tmp_path, padding_value=-2000))[0]
    element = ds[0x00280120]
    assert element.keyword == "PixelPaddingValue"
    assert element.VR == "SS" and element.value == -2000
    arr = ds.pixel_array
    padded = hu[0] < -1023.5
    assert padded.any()
    assert (arr[padded] == -2000).all()
    np.testing.assert_array_equal(arr[~padded], hu[0][~padded] + 1024)


def test_unsigned_padding_value_uses_us(tmp_path: Path) -> None:
    ds = _read(write_ct_series(_volume(), tmp_path, storage="uint16", padding_value=0xFFFF))[0]
    assert ds[0x00280120].VR == "US" and ds.PixelPaddingValue == 0xFFFF


def test_padding_value_must_fit_the_storage(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="padding_value"):
        write_ct_series(_volume(), tmp_path, storage="uint12", padding_value=-2000)


def test_skipped_slices_leave_a_gap(tmp_path: Path) -> None:
    paths = write_ct_series(_volume(), tmp_path, skip_slices=[2, 3])
    datasets = _read(paths)
    assert len(paths) == 4
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == [0.0, 5.0, 20.0, 25.0]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 5, 6]


def test_skipping_every_slice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no slice"):
        write_ct_series(_volume((2, 8, 8)), tmp_path, skip_slices=[0, 1])


def test_uid_file_names(tmp_path: Path) -> None:
    paths = write_ct_series(_volume(), tmp_path, file_names="uid")
    for path, ds in zip(paths, _read(paths), strict=True):
        assert path.name == f"{ds.SOPInstanceUID}.dcm"


def test_index_file_names_follow_instance_number(tmp_path: Path) -> None:
    paths = write_ct_series(_volume(), tmp_path, file_names="index")
    assert [p.name for p in paths] == [f"IM{i:04d}" for i in range(1, 7)]
    assert [ds.InstanceNumber for ds in _read(paths)] == list(range(1, 7))


def test_shuffled_file_names_have_no_suffix_and_no_spatial_order(tmp_path: Path) -> None:
    paths = write_ct_series(_volume((12, 8, 8)), tmp_path, file_names="shuffled", seed=3)
    names = [p.name for p in paths]
    assert all("." not in name for name in names)
    assert len(set(names)) == 12
    assert names != sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    again = write_ct_series(_volume((12, 8, 8)), tmp_path / "again", file_names="shuffled", seed=3)
    assert [p.name for p in again] == names


def test_shuffled_instance_numbers_are_not_in_spatial_order(tmp_path: Path) -> None:
    paths = write_ct_series(_volume(), tmp_path, shuffle_instance_numbers=True)
    numbers = [ds.InstanceNumber for ds in _read(paths)]
    assert sorted(numbers) == list(range(1, 7))
    assert numbers != sorted(numbers)
    z = [float(ds.ImagePositionPatient[2]) for ds in _read(paths)]
    assert z == sorted(z)


def test_other_modality_and_sop_class(tmp_path: Path) -> None:
    ds = _read(
        write_ct_series(_volume((2, 8, 8)), tmp_path, modality="MR", sop_class="secondary-capture")
    )[0]
    assert ds.Modality == "MR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def test_existing_files_are_not_overwritten(tmp_path: Path) -> None:
    write_ct_series(_volume((2, 8, 8)), tmp_path, file_names="index")
    with pytest.raises(FileExistsError):
        write_ct_series(_volume((2, 8, 8)), tmp_path, file_names="index")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compression": "jpeg"}, "compression"),
        ({"storage": "int8"}, "storage"),
        ({"photometric": "RGB"}, "photometric"),
        ({"file_names": "random"}, "file_names"),
        ({"tilt_deg": 90.0}, "tilt"),
        ({"slice_spacing": 0.0}, "spacing"),
        ({"sop_class": "mr"}, "sop_class"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_ct_series(_volume((2, 8, 8)), tmp_path, **kwargs)


def test_volume_must_be_3d_and_finite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3-D"):
        write_ct_series(np.zeros((8, 8)), tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        write_ct_series(np.full((1, 4, 4), np.nan), tmp_path)


def test_dataset_without_pixels_is_a_valid_sr_document(tmp_path: Path) -> None:
    path = write_dataset_without_pixels(tmp_path / "report.dcm")
    with config.strict_reading():
        ds = pydicom.dcmread(path)
    assert "PixelData" not in ds
    assert ds.Modality == "SR"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ValueType == "CONTAINER"


def test_ct_object_without_pixels(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dataset_without_pixels(tmp_path / "x", modality="CT"))
    assert ds.SOPClassUID == CT_IMAGE_STORAGE and "PixelData" not in ds
