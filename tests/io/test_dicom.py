"""Hounsfield units from one DICOM slice: every storage quirk, compression and bad file."""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.errors import InputError, MissingDecoderError
from ichscan.io.dicom import (
    PixelEncoding,
    check_ct_slice,
    hu_lookup_table,
    read_dataset,
    read_header,
    read_slice_hu,
)
from ichscan.io.dicom_write import write_ct_series, write_dataset_without_pixels


def read_header_checked(path: Path) -> None:
    """What series discovery does with each file: header only, then the CT checks."""
    check_ct_slice(read_header(path), str(path))


def _one_slice(tmp_path: Path, hu: np.ndarray, **kw) -> Path:
    return write_ct_series(hu[None] if hu.ndim == 2 else hu, tmp_path, **kw)[0]


# --- real RSNA 2019 slices -------------------------------------------------------------------


def test_real_rsna_slices_give_plausible_hu(rsna_dicom_dir: Path) -> None:
    files = sorted((rsna_dicom_dir / "stage_2_train").glob("ID_*.dcm"))
    assert len(files) == 5
    storages = set()
    for f in files:
        hu, header = read_slice_hu(f)
        storages.add((header.encoding.bits_stored, header.encoding.signed))
        assert hu.dtype == np.int16 and hu.shape == (512, 512)
        # Padding (-2048 / -3024 HU on these files) becomes air; nothing is below air.
        assert hu.min() == -1024
        # The head is there: soft tissue near 40 HU and bone above 700 HU.
        assert ((hu > 20) & (hu < 60)).sum() > 5000
        assert hu.max() > 700
    # The set mixes signed 16-bit and unsigned 12-bit storage: both paths are exercised.
    assert storages == {(16, True), (12, False)}


def test_real_rsna_header_reads_multivalued_window_and_ids(rsna_dicom_dir: Path) -> None:
    header = read_header(rsna_dicom_dir / "stage_2_train" / "ID_2008dd408.dcm")
    assert header.sop_uid == "ID_2008dd408"
    assert header.modality == "CT"
    assert header.encoding.intercept == -1024


def test_real_rsna_padding_matches_pydicom_rescale_elsewhere(rsna_dicom_dir: Path) -> None:
    f = rsna_dicom_dir / "stage_2_train" / "ID_1b5ac170c.dcm"
    ds = pydicom.dcmread(f)
    expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    hu, _ = read_slice_hu(f)
    inside = expected >= -1024
    assert (expected < -1024).any(), "this file has out-of-field padding"
    np.testing.assert_array_equal(hu[inside], expected[inside])
    assert (hu[~inside] == -1024).all()


# --- constructed files -----------------------------------------------------------------------


def test_rsna_bad_intercept_is_unwrapped(tmp_path: Path) -> None:
    """12-bit unsigned with intercept 0: the challenge's wrap fix gives the true HU back."""
    true_hu = np.array([[-1000, -1000, 0, 40], [80, 700, 1500, -500]], dtype=np.int16)
    # What such a file stores: negative HU wrapped around 4096, with intercept 0.
    stored = np.where(true_hu < 0, true_hu.astype(np.int32) + 4096, true_hu)
    path = write_ct_series(
        stored[None].astype(np.int16),
        tmp_path,
        storage="uint12",
        rescale_intercept=0.0,
    )[0]
    hu, header = read_slice_hu(path)
    assert header.encoding.rsna_wrap_fix
    assert any("RSNA 2019 wrap fix" in n for n in header.notes)
    np.testing.assert_array_equal(hu, np.maximum(true_hu, -1024))


def test_rsna_fix_not_applied_to_normal_12bit(tmp_path: Path) -> None:
    hu_in = np.array([[-1024, 0], [40, 1000]], dtype=np.int16)
    path = _one_slice(tmp_path, hu_in, storage="uint12", rescale_intercept=-1024.0)
    hu, header = read_slice_hu(path)
    assert not header.encoding.rsna_wrap_fix
    np.testing.assert_array_equal(hu, hu_in)


@pytest.mark.parametrize("storage", ["int16", "uint16", "uint12"])
def test_storage_round_trip(tmp_path: Path, phantom_volume: np.ndarray, storage: str) -> None:
    path = _one_slice(tmp_path, phantom_volume[6], storage=storage)
    hu, _ = read_slice_hu(path)
    np.testing.assert_array_equal(hu, np.clip(phantom_volume[6], -1024, 3071))


def test_fractional_slope_and_intercept(tmp_path: Path) -> None:
    hu_in = np.array([[-1000, -2], [40, 1000]], dtype=np.int16)
    path = _one_slice(tmp_path, hu_in, rescale_slope=0.5, rescale_intercept=-1000.0)
    hu, _ = read_slice_hu(path)
    np.testing.assert_array_equal(hu, hu_in)


def test_missing_rescale_defaults_and_says_so(tmp_path: Path) -> None:
    hu_in = np.array([[-1000, 0], [40, 1000]], dtype=np.int16)
    path = _one_slice(tmp_path, hu_in, write_rescale=False)
    hu, header = read_slice_hu(path)
    np.testing.assert_array_equal(hu, hu_in)
    assert any("slope 1, intercept 0" in n for n in header.notes)


def test_padding_value_becomes_air(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    image = phantom_volume[6].copy()
    image[:8, :8] = -1024  # outside the field of view: the writer stores the padding value
    path = _one_slice(tmp_path, image, padding_value=-2000)
    ds = pydicom.dcmread(path)
    assert int(ds.PixelPaddingValue) == -2000
    assert (ds.pixel_array[:8, :8] == -2000).all()
    hu, _ = read_slice_hu(path)
    assert (hu[:8, :8] == -1024).all()
    np.testing.assert_array_equal(hu[8:], image[8:])


def test_padding_value_inside_hu_range_is_still_air() -> None:
    """A padding value that would rescale to a plausible HU must still be air."""
    enc = PixelEncoding(16, 16, False, 1.0, -1024.0, 3000, None, False)
    table = hu_lookup_table(enc)
    assert table[3000] == -1024 and table[2999] == 2999 - 1024


def test_padding_value_outside_the_stored_bits_is_still_air() -> None:
    """12-bit unsigned with PixelPaddingValue 63536 (-2000 written as US): the padding word
    is air although masking to 12 bits would read it as 2096."""
    enc = PixelEncoding(16, 12, False, 1.0, -1024.0, 63536, None, False)
    table = hu_lookup_table(enc)
    assert table[63536] == -1024 and table[2096] == 2096 - 1024


def test_signed_12_bit_with_and_without_sign_extension() -> None:
    enc = PixelEncoding(16, 12, True, 1.0, 0.0, None, None, False)
    table = hu_lookup_table(enc)
    # -100 stored in 12 bits two's complement: 4096-100 = 3996 (not extended) or
    # 65536-100 (extended by the decoder): both mean -100.
    assert table[3996] == -100
    assert table[65536 - 100] == -100
    assert table[100] == 100


@pytest.mark.parametrize("storage", ["int16", "uint16", "uint12"])
def test_monochrome1_with_rescale_gives_true_hu(
    tmp_path: Path, phantom_volume: np.ndarray, storage: str
) -> None:
    """The mirror is folded into a negative slope; for 12-bit unsigned storage that is slope
    -1 with intercept 3071, which must not be taken for an RSNA wrapped image."""
    path = _one_slice(tmp_path, phantom_volume[6], photometric="MONOCHROME1", storage=storage)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    hu, header = read_slice_hu(path)
    assert not header.encoding.rsna_wrap_fix
    np.testing.assert_array_equal(hu, np.clip(phantom_volume[6], -1024, 3071))


@pytest.mark.parametrize("storage", ["int16", "uint16", "uint12"])
def test_monochrome1_without_rescale_is_inverted_back(tmp_path: Path, storage: str) -> None:
    """Mirrored within the stored range, signed storage included (-1 - v, not 4095 - v)."""
    hu_in = np.array([[0, 100], [1000, 3000]], dtype=np.int16)
    if storage == "int16":
        hu_in = hu_in - 1024
    path = _one_slice(
        tmp_path, hu_in, photometric="MONOCHROME1", write_rescale=False, storage=storage
    )
    hu, _ = read_slice_hu(path)
    np.testing.assert_array_equal(hu, hu_in)


@pytest.mark.parametrize("storage", ["uint12", "int12"])
def test_bits_above_bits_stored_are_not_part_of_the_value(
    tmp_path: Path, phantom_volume: np.ndarray, storage: str
) -> None:
    """BitsStored 12 in 16 allocated with bit 15 set (an old overlay plane) in half of the
    image: the HU are those of the clean file, and agree with pydicom's pixel_array."""
    image = np.clip(phantom_volume[6], -1024, 2047)
    path = _one_slice(tmp_path, image, storage="uint12")
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int64)
    if storage == "int12":  # 12-bit two's complement, not sign-extended, HU stored as is
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        stored = (image.astype(np.int64)) & 0x0FFF
    dirty = stored.astype(np.uint16)
    dirty[:, : dirty.shape[1] // 2] |= 0x8000
    ds.PixelData = dirty.tobytes()
    ds.save_as(path, enforce_file_format=True)
    hu, _ = read_slice_hu(path)
    np.testing.assert_array_equal(hu, image)
    reference = pydicom.dcmread(path).pixel_array.astype(np.int64) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, np.maximum(reference, -1024))


@settings(max_examples=40, deadline=None)
@given(
    bits_stored=st.integers(8, 16),
    signed=st.booleans(),
    invert=st.booleans(),
    high=st.integers(0, 0xFF),
)
def test_hu_table_ignores_bits_above_bits_stored(
    bits_stored: int, signed: bool, invert: bool, high: int
) -> None:
    enc = PixelEncoding(16, bits_stored, signed, 1.0, -1024.0, None, None, False, invert)
    table = hu_lookup_table(enc)
    stored = np.arange(1 << bits_stored)
    garbage = (high << 8) & 0xFFFF & ~((1 << bits_stored) - 1)
    np.testing.assert_array_equal(table[stored | garbage], table[stored])


COMPRESSIONS = ["rle", "jpegls", "jpeg2000", "jpeg-lossless", "deflate"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("storage", ["int16", "uint12"])
def test_compressed_syntaxes_decode_to_exact_hu(
    tmp_path: Path, phantom_volume: np.ndarray, compression: str, storage: str
) -> None:
    path = _one_slice(tmp_path, phantom_volume[6], compression=compression, storage=storage)
    hu, header = read_slice_hu(path)
    assert header.transfer_syntax != "1.2.840.10008.1.2.1"
    np.testing.assert_array_equal(hu, np.clip(phantom_volume[6], -1024, 3071))


def test_jpeg_lossless_sv1_syntax_uid(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    path = _one_slice(tmp_path, phantom_volume[6], compression="jpeg-lossless")
    assert read_header(path).transfer_syntax == "1.2.840.10008.1.2.4.70"


def test_missing_decoder_names_syntax_and_package(
    tmp_path: Path, phantom_volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom.pixels.decoders.base import Decoder

    path = _one_slice(tmp_path, phantom_volume[6], compression="jpeg2000")
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(MissingDecoderError) as err:
        read_slice_hu(path)
    message = str(err.value)
    assert str(path) in message
    assert "JPEG 2000" in message and "pylibjpeg-openjpeg" in message


# --- bad input -------------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    path = _one_slice(tmp_path, phantom_volume[6])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        read_slice_hu(path)
    assert str(path) in str(err.value)
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


@pytest.mark.parametrize("keep", [132, 300, 420, 500, 600])
def test_truncated_in_header_says_truncated(
    tmp_path: Path, phantom_volume: np.ndarray, keep: int
) -> None:
    """A file cut before its PixelData parses quietly in pydicom; it must not be reported
    as an object that has no pixels (the wrong cause), from a path or from a zip member."""
    path = _one_slice(tmp_path, phantom_volume[6])
    data = path.read_bytes()[:keep]
    path.write_bytes(data)
    with pytest.raises(InputError, match=re.escape(path.name) + ".*truncated DICOM file"):
        read_slice_hu(path)
    with pytest.raises(InputError, match="truncated DICOM file"):
        read_dataset(io.BytesIO(data), name="member.dcm", header_only=True)


def test_complete_object_without_pixels_is_not_called_truncated(tmp_path: Path) -> None:
    path = write_dataset_without_pixels(tmp_path / "sr.dcm")
    with pytest.raises(InputError) as err:
        read_slice_hu(path)
    assert "no pixel data" in str(err.value)
    assert "truncated" not in str(err.value)


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(InputError, match="not a DICOM file"):
        read_slice_hu(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.dcm"):
        read_slice_hu(path)


def test_structured_report_has_no_pixels(tmp_path: Path) -> None:
    path = write_dataset_without_pixels(tmp_path / "sr.dcm")
    with pytest.raises(InputError, match="no pixel data"):
        read_slice_hu(path)


def test_non_ct_modality(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    path = _one_slice(tmp_path, phantom_volume[6], modality="MR")
    with pytest.raises(InputError, match="modality is MR, not CT"):
        read_slice_hu(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_slice_hu(tmp_path / "nope.dcm")


def test_multi_frame_ct_is_refused_not_cut_to_its_first_frame(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    path = _one_slice(tmp_path, phantom_volume[6])
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(path)
    with pytest.raises(InputError, match=r"multi-frame CT \(3 frames"):
        read_slice_hu(path)


def test_large_non_dicom_file_is_refused_at_once(tmp_path: Path) -> None:
    # 50 MB of zeros: pydicom's forced read would crawl through it; the sniff refuses it.
    import time

    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as fh:
        fh.truncate(50 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(InputError, match="not a DICOM file"):
        read_slice_hu(path)
    assert time.perf_counter() - start < 5


def test_preamble_less_dicom_is_still_read(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    path = _one_slice(tmp_path, phantom_volume[6])
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(path)
    # The dataset alone, implicit VR little endian: no preamble, no DICM, no file meta.
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(buf.getvalue())
    assert b"DICM" not in bare.read_bytes()[:200]
    np.testing.assert_array_equal(read_slice_hu(bare)[0], read_slice_hu(path)[0])


def test_deeply_nested_sequences_are_one_clear_error(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    """5000 nested sequences exhaust pydicom's recursion: a corrupt file, not a traceback."""
    path = _one_slice(tmp_path, phantom_volume[6])
    data = path.read_bytes()
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    sq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    at = data.find(struct.pack("<HH", 0x0010, 0x0020))
    path.write_bytes(data[:at] + (sq + item) * 5000 + (item_end + sq_end) * 5000 + data[at:])
    with pytest.raises(InputError, match="nested too deep"):
        read_slice_hu(path)


def _edited(path: Path, **tags: object) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_empty_pixel_data(tmp_path: Path, phantom_volume: np.ndarray) -> None:
    path = _edited(_one_slice(tmp_path, phantom_volume[6]), PixelData=b"")
    with pytest.raises(InputError, match="empty pixel data"):
        read_header_checked(path)
    with pytest.raises(InputError, match="empty pixel data"):
        read_slice_hu(path)


def test_rows_columns_that_do_not_match_the_pixel_data(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    """Rows halved on a full image would silently read half the buffer as the image."""
    path = _edited(_one_slice(tmp_path, phantom_volume[6]), Rows=32)
    with pytest.raises(InputError, match="Rows/Columns do not match the pixel data"):
        read_header_checked(path)
    with pytest.raises(InputError, match="Rows/Columns do not match the pixel data"):
        read_slice_hu(path)


def test_matrix_larger_than_any_ct_is_refused_from_the_header(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    path = _edited(_one_slice(tmp_path, phantom_volume[6]), Rows=65535, Columns=65535)
    with pytest.raises(InputError, match="65535x65535: larger than any CT image"):
        read_header_checked(path)


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ({"RescaleSlope": "nan"}, "RescaleSlope nan"),
        ({"RescaleSlope": "1e308"}, "RescaleSlope 1e+308"),
        ({"RescaleIntercept": "inf"}, "RescaleIntercept inf"),
        ({"BitsStored": 40}, "BitsStored 40 does not fit BitsAllocated 16"),
        ({"PixelRepresentation": 7}, "PixelRepresentation 7"),
        ({"BitsAllocated": 32}, "BitsAllocated 32"),
    ],
)
def test_nonsense_pixel_encoding_is_refused(
    tmp_path: Path, phantom_volume: np.ndarray, tags: dict, problem: str
) -> None:
    path = _edited(_one_slice(tmp_path, phantom_volume[6]), **tags)
    with pytest.raises(InputError, match=re.escape(problem)):
        read_slice_hu(path)


def test_non_finite_or_zero_geometry_counts_as_missing(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    path = _edited(
        _one_slice(tmp_path, phantom_volume[6]),
        ImagePositionPatient=["nan", "0", "0"],
        PixelSpacing=["0", "0"],
        SliceThickness="inf",
    )
    header = read_header(path)
    assert header.position is None
    assert header.pixel_spacing is None
    assert header.slice_thickness is None


def test_deflate_bomb_is_refused_before_inflating(
    tmp_path: Path, phantom_volume: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ichscan.io import dicom

    path = _one_slice(tmp_path, phantom_volume[6], compression="deflate")
    hu, _ = read_slice_hu(path)  # under the limit: read as usual
    np.testing.assert_array_equal(hu, np.clip(phantom_volume[6], -1024, None))
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", 4096)
    with pytest.raises(InputError, match="inflates to more than"):
        read_header(path)
