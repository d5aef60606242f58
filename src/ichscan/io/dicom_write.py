"""Write a CT volume as a real, standards-valid DICOM series.

Used by the tests (to build every DICOM quirk a reader has to survive: compressed transfer
syntaxes, MONOCHROME1, 12-bit storage, padding, gantry tilt, shuffled instance numbers,
missing slices), by the synthetic data generator and by the demo. The geometry follows the
conventions in :mod:`ichscan.scan`: slice 0 of ``hu`` is the most inferior slice.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
KEY_OBJECT_SELECTION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.59")
GRAYSCALE_PRESENTATION_STATE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.1")

SOP_CLASSES: dict[str, UID] = {
    "ct": CT_IMAGE_STORAGE,
    "secondary-capture": SECONDARY_CAPTURE_STORAGE,
}

# Syntaxes pydicom encodes itself via Dataset.compress().
_PYDICOM_COMPRESSED: dict[str, UID] = {
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
# Syntaxes that only change how the dataset is serialised.
_NATIVE: dict[str, UID] = {
    "none": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
}
COMPRESSIONS: tuple[str, ...] = (*_NATIVE, *_PYDICOM_COMPRESSED, "jpeg-lossless")

FILE_NAME_MODES = ("uid", "index", "shuffled")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")


@dataclass(frozen=True)
class _Storage:
    bits_stored: int
    signed: bool

    @property
    def min_value(self) -> int:
        return -(2 ** (self.bits_stored - 1)) if self.signed else 0

    @property
    def max_value(self) -> int:
        return 2 ** (self.bits_stored - 1) - 1 if self.signed else 2**self.bits_stored - 1

    @property
    def dtype(self) -> type[np.integer]:
        return np.int16 if self.signed else np.uint16


STORAGES: dict[str, _Storage] = {
    "int16": _Storage(bits_stored=16, signed=True),
    "uint12": _Storage(bits_stored=12, signed=False),
    "uint16": _Storage(bits_stored=16, signed=False),
}

# Fixed dates keep generated files byte-comparable between runs (apart from the UIDs).
_STUDY_DATE = "20240101"
_STUDY_TIME = "120000"


def write_ct_series(
    hu: np.ndarray,
    out_dir: str | Path,
    *,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    slice_spacing: float = 5.0,
    slice_thickness: float | None = None,
    tilt_deg: float = 0.0,
    origin: tuple[float, float, float] | None = None,
    patient_id: str = "SYNTH0001",
    patient_name: str = "Synthetic^Head",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Head 5mm",
    convolution_kernel: str = "H30s",
    modality: str = "CT",
    compression: str = "none",
    storage: str = "int16",
    photometric: str = "MONOCHROME2",
    padding_value: int | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    write_rescale: bool = True,
    file_names: str = "uid",
    shuffle_instance_numbers: bool = False,
    skip_slices: Sequence[int] = (),
    sop_class: str = "ct",
    seed: int = 0,
) -> list[Path]:
    """Write ``hu`` ([slices, rows, cols], slice 0 most inferior) as one DICOM file per slice.

    Stored values are ``round((hu - rescale_intercept) / rescale_slope)`` clipped to the
    ``storage`` range (``hu`` itself when ``write_rescale`` is False, in which case the rescale
    tags are omitted). ``photometric="MONOCHROME1"`` mirrors the stored values within the
    storage range (``min + max - stored``, i.e. ``max - stored`` for unsigned storage) and,
    when rescale tags are written, negates the slope to match, so HU stay standard-correct.
    ``padding_value`` is a raw stored value: voxels with ``hu < -1023.5`` are written as it
    (after any MONOCHROME1 mirroring) and PixelPaddingValue is set to it.

    Geometry: ImageOrientationPatient ``[1,0,0, 0,cos t,-sin t]``; slice ``k`` is at
    ``origin + k * slice_spacing / cos t * [0,0,1]``, so consecutive planes are
    ``slice_spacing`` apart along the plane normal ``[0, sin t, cos t]``.

    ``file_names``: ``"uid"`` -> ``<SOPInstanceUID>.dcm``; ``"index"`` -> ``IM%04d`` numbered
    by InstanceNumber; ``"shuffled"`` -> random hex names. Neither of the last two has a suffix.
    InstanceNumber is ``k + 1`` (skipped slices leave gaps) unless
    ``shuffle_instance_numbers``, which permutes the numbers so that they are not in spatial
    order. ``sop_class`` is ``"ct"``, ``"secondary-capture"`` or a SOP Class UID.

    Returns the written paths in spatial order (inferior to superior). Refuses to overwrite
    an existing file.
    """
    hu = _check_volume(hu)
    _check_choice("compression", compression, COMPRESSIONS)
    _check_choice("storage", storage, tuple(STORAGES))
    _check_choice("photometric", photometric, PHOTOMETRICS)
    _check_choice("file_names", file_names, FILE_NAME_MODES)
    if slice_spacing <= 0 or min(pixel_spacing) <= 0:
        raise ValueError("slice_spacing and pixel_spacing must be positive")
    if abs(tilt_deg) >= 90:
        raise ValueError(f"tilt_deg must be within (-90, 90), got {tilt_deg}")
    if write_rescale and rescale_slope == 0:
        raise ValueError("rescale_slope must not be 0")
    layout = STORAGES[storage]
    if padding_value is not None and not layout.min_value <= padding_value <= layout.max_value:
        raise ValueError(
            f"padding_value {padding_value} does not fit {storage} storage "
            f"[{layout.min_value}, {layout.max_value}]"
        )

    n_slices, rows, cols = hu.shape
    skipped = {int(k) for k in skip_slices}
    written = [k for k in range(n_slices) if k not in skipped]
    if not written:
        raise ValueError("skip_slices leaves no slice to write")

    stored = _to_stored(
        hu,
        layout,
        photometric=photometric,
        padding_value=padding_value,
        slope=rescale_slope if write_rescale else 1.0,
        intercept=rescale_intercept if write_rescale else 0.0,
    )

    rng = np.random.default_rng(seed)
    instance_numbers = _instance_numbers(written, shuffle_instance_numbers, rng)
    random_names = _random_names(len(written), rng) if file_names == "shuffled" else None

    tilt = math.radians(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    if origin is None:
        # Centre the image on x = y = 0, as scanners centre the reconstruction field of view.
        centre_offset = (cols - 1) / 2 * pixel_spacing[1] * row_dir + (
            rows - 1
        ) / 2 * pixel_spacing[0] * col_dir
        origin_vec = np.array([-centre_offset[0], -centre_offset[1], 0.0])
    else:
        origin_vec = np.asarray(origin, dtype=np.float64)
    # The table moves along z; tilting the gantry does not change the table increment, so the
    # z step is stretched to keep the plane-to-plane distance equal to slice_spacing.
    z_step = slice_spacing / math.cos(tilt)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = _series_dataset(
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid or generate_uid(),
        series_number=series_number,
        series_description=series_description,
        convolution_kernel=convolution_kernel,
        modality=modality,
        sop_class=_sop_class_uid(sop_class),
        pixel_spacing=pixel_spacing,
        slice_thickness=slice_spacing if slice_thickness is None else slice_thickness,
        tilt_deg=tilt_deg,
        orientation=[*row_dir, *col_dir],
        rows=rows,
        cols=cols,
        layout=layout,
        photometric=photometric,
        padding_value=padding_value,
        rescale=_written_rescale(rescale_slope, rescale_intercept, layout, photometric)
        if write_rescale
        else None,
    )

    paths: list[Path] = []
    for i, k in enumerate(written):
        position = origin_vec + k * z_step * np.array([0.0, 0.0, 1.0])
        ds = _slice_dataset(
            common,
            position=position,
            slice_location=float(np.dot(position, normal)),
            instance_number=instance_numbers[i],
            pixels=stored[k],
        )
        if file_names == "uid":
            name = f"{ds.SOPInstanceUID}.dcm"
        elif file_names == "index":
            name = f"IM{instance_numbers[i]:04d}"
        else:
            assert random_names is not None
            name = random_names[i]
        path = out / name
        if path.exists():
            raise FileExistsError(f"{path} already exists; write each series to a fresh folder")
        _save(ds, path, compression)
        paths.append(path)
    return paths


def write_dataset_without_pixels(
    out_path: str | Path,
    *,
    modality: str = "SR",
    patient_id: str = "SYNTH0001",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """Write a valid DICOM file that has no PixelData, for bad-input tests.

    ``modality="SR"`` gives a Basic Text SR document, ``"KO"`` a Key Object Selection
    document, ``"PR"`` a Grayscale Softcopy Presentation State; anything else gives a CT Image
    Storage object with that Modality and the pixel data missing (a broken export).
    """
    classes = {
        "SR": BASIC_TEXT_SR_STORAGE,
        "KO": KEY_OBJECT_SELECTION_STORAGE,
        "PR": GRAYSCALE_PRESENTATION_STATE_STORAGE,
    }
    sop_class = classes.get(modality, CT_IMAGE_STORAGE)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    _add_patient_and_study(ds, patient_id, "Synthetic^Head", study_uid or generate_uid())
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 99
    ds.Manufacturer = "ichscan-synthetic"
    ds.InstanceNumber = 1
    ds.ContentDate = _STUDY_DATE
    ds.ContentTime = _STUDY_TIME
    if modality == "SR":
        _add_text_sr_content(ds)
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- pixel values -------------------------------------------------------------------------


def _check_volume(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) == 0:
        raise ValueError(f"hu must be a non-empty 3-D [slices, rows, cols] volume, got {hu.shape}")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise ValueError(f"hu must be integer or float, got {hu.dtype}")
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        raise ValueError("hu contains NaN or infinite values")
    return hu


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _to_stored(
    hu: np.ndarray,
    layout: _Storage,
    *,
    photometric: str,
    padding_value: int | None,
    slope: float,
    intercept: float,
) -> np.ndarray:
    values = np.rint((hu.astype(np.float64) - intercept) / slope)
    values = np.clip(values, layout.min_value, layout.max_value).astype(np.int64)
    if photometric == "MONOCHROME1":
        # Mirror within the storage range so signed data stays in range too.
        values = layout.min_value + layout.max_value - values
    if padding_value is not None:
        values[hu < -1023.5] = padding_value
    return values.astype(layout.dtype)


def _written_rescale(
    slope: float, intercept: float, layout: _Storage, photometric: str
) -> tuple[float, float]:
    """The rescale that maps the values actually stored back to HU. MONOCHROME1 mirrors the
    stored values, and the standard applies the rescale to stored values whatever the
    photometric, so the mirror is folded into a negative slope: a standard reader gets HU."""
    if photometric != "MONOCHROME1":
        return slope, intercept
    return -slope, slope * (layout.min_value + layout.max_value) + intercept


def _instance_numbers(written: list[int], shuffle: bool, rng: np.random.Generator) -> list[int]:
    numbers = [k + 1 for k in written]
    if not shuffle or len(numbers) < 2:
        return numbers
    order = rng.permutation(len(numbers))
    if np.array_equal(order, np.arange(len(numbers))):
        # The caller asked for numbers that are not in spatial order; never hand back identity.
        order = order[::-1]
    return [numbers[i] for i in order]


def _random_names(count: int, rng: np.random.Generator) -> list[str]:
    names: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < count:
        name = f"{int(rng.integers(0, 2**48)):012x}"
        if name not in names:
            names.add(name)
            ordered.append(name)
    return ordered


# -- datasets -----------------------------------------------------------------------------


def _ds(value: float) -> DSfloat:
    # DS strings are limited to 16 characters; auto_format rounds to fit instead of failing.
    return DSfloat(value, auto_format=True)


def _sop_class_uid(sop_class: str) -> UID:
    if sop_class in SOP_CLASSES:
        return SOP_CLASSES[sop_class]
    uid = UID(sop_class)
    if not uid.is_valid:
        raise ValueError(f"sop_class must be one of {', '.join(SOP_CLASSES)} or a UID")
    return uid


def _add_patient_and_study(ds: Dataset, patient_id: str, patient_name: str, study: str) -> None:
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study
    ds.StudyDate = _STUDY_DATE
    ds.StudyTime = _STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""


def _series_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    convolution_kernel: str,
    modality: str,
    sop_class: UID,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    tilt_deg: float,
    orientation: list[float],
    rows: int,
    cols: int,
    layout: _Storage,
    photometric: str,
    padding_value: int | None,
    rescale: tuple[float, float] | None,
) -> Dataset:
    """Everything shared by the slices of one series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    _add_patient_and_study(ds, patient_id, patient_name, study_uid)
    ds.SeriesDate = _STUDY_DATE
    ds.SeriesTime = _STUDY_TIME
    ds.AcquisitionDate = _STUDY_DATE
    ds.ContentDate = _STUDY_DATE
    ds.ContentTime = _STUDY_TIME
    ds.Modality = modality
    ds.Manufacturer = "ichscan-synthetic"
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = _ds(slice_thickness)
    ds.KVP = _ds(120.0)
    ds.GantryDetectorTilt = _ds(tilt_deg)
    ds.ConvolutionKernel = convolution_kernel
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = layout.bits_stored
    ds.HighBit = layout.bits_stored - 1
    ds.PixelRepresentation = 1 if layout.signed else 0
    if padding_value is not None:
        # PixelPaddingValue is "US or SS": the VR must follow PixelRepresentation.
        ds.add_new(0x00280120, "SS" if layout.signed else "US", int(padding_value))
    ds.WindowCenter = _ds(40.0)
    ds.WindowWidth = _ds(80.0)
    if rescale is not None:
        ds.RescaleIntercept = _ds(rescale[1])
        ds.RescaleSlope = _ds(rescale[0])
        ds.RescaleType = "HU"
    return ds


def _slice_dataset(
    common: Dataset,
    *,
    position: np.ndarray,
    slice_location: float,
    instance_number: int,
    pixels: np.ndarray,
) -> Dataset:
    ds = Dataset()
    ds.update(common)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(slice_location)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _file_meta(ds: Dataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    pydicom.dataset.validate_file_meta(meta, enforce_standard=True)
    return meta


def _add_text_sr_content(ds: Dataset) -> None:
    """The minimum SR Document content of a Basic Text SR: a titled container with text."""
    title = Dataset()
    title.CodeValue = "18748-4"
    title.CodingSchemeDesignator = "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding_name = Dataset()
    finding_name.CodeValue = "121071"
    finding_name.CodingSchemeDesignator = "DCM"
    finding_name.CodeMeaning = "Finding"
    finding.ConceptNameCodeSequence = DicomSequence([finding_name])
    finding.TextValue = "Synthetic report with no images."
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentSequence = DicomSequence([finding])


# -- encoding -----------------------------------------------------------------------------


def _save(ds: Dataset, path: Path, compression: str) -> None:
    if compression in _NATIVE:
        ds.file_meta = _file_meta(ds, _NATIVE[compression])
        ds.save_as(path, enforce_file_format=True)
        return
    if compression in _PYDICOM_COMPRESSED:
        ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
        # Keep the SOPInstanceUID: the file name and the series' bookkeeping already use it.
        ds.compress(_PYDICOM_COMPRESSED[compression], generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        return
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    _save_jpeg_lossless(ds, path)


def _save_jpeg_lossless(ds: Dataset, path: Path) -> None:
    """JPEG Lossless SV1 via GDCM, since pydicom has no encoder for it; verified on the way."""
    import gdcm  # Imported here: only this syntax needs it.

    expected = ds.pixel_array
    with tempfile.TemporaryDirectory(prefix="ichscan-jpegll-") as tmp:
        source = Path(tmp) / "native.dcm"
        ds.save_as(source, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(source))
        if not reader.Read():
            raise RuntimeError(f"GDCM could not read the uncompressed slice for {path}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM could not encode {path} as JPEG Lossless SV1")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM could not write {path}")
    _verify_lossless(path, expected, JPEGLosslessSV1)


def _verify_lossless(path: Path, expected: np.ndarray, syntax: UID) -> None:
    # Decode with pylibjpeg, not GDCM, so the encoder is not checking its own work.
    written = pydicom.dcmread(path)
    actual = written.file_meta.TransferSyntaxUID
    if actual != syntax:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{path}: expected {syntax.name}, GDCM wrote {actual}")
    written.pixel_array_options(decoding_plugin="pylibjpeg")
    decoded = written.pixel_array
    if decoded.dtype != expected.dtype or not np.array_equal(decoded, expected):
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{path}: JPEG Lossless round trip changed the stored values")
