"""Reading one DICOM CT slice: its header, and its pixels as Hounsfield units.

Stored pixel values become HU through one lookup table per distinct pixel encoding
(bits, signedness, slope, intercept, padding, the RSNA wrap fix). A table lookup is both the
fastest way to do it for 12/16-bit data and the place where every quirk lives, so the
training fast path and the Scan reader cannot disagree.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ichscan.errors import InputError, MissingDecoderError, one_line

# Real archives are full of values that break the letter of the standard (RSNA's "ID_..."
# UIDs, for one); validating them on every read costs time and floods the log with warnings
# about things ichscan tolerates anyway.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

AIR_HU = -1024
# Bumped whenever a change to the decode gives other HU for some file (2: bits above
# BitsStored masked, signed MONOCHROME1 mirrored, the RSNA wrap fix only at slope 1).
# Prepared shards are keyed on it, so slices decoded by older code are not reused.
HU_DECODE_VERSION = 2
# No CT image is larger: a header claiming more (65535 x 65535 on 512 x 512 pixel data, or a
# compressed frame of zeros) would make the volume allocation the bomb.
MAX_CT_MATRIX = 4096
# A deflated dataset is inflated whole by pydicom: one that inflates beyond this is refused
# before it is (a 1.5 MB file can hold 1.5 GB of zeros). A 500-frame Enhanced CT is ~260 MB.
MAX_INFLATED_BYTES = 512 << 20
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}

# Which package brings a decoder for each compressed syntax (first one named is preferred).
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg or pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or nothing: pydicom decodes RLE natively)",
}

# Tags read for series discovery; stopping before PixelData keeps a header read cheap.
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
}


@dataclass(frozen=True)
class PixelEncoding:
    """Everything needed to turn stored values into HU; hashable, so its table is cached."""

    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    padding_value: int | None
    padding_limit: int | None
    rsna_wrap_fix: bool
    invert: bool = False


@dataclass(frozen=True)
class SliceHeader:
    path: str
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    rows: int
    cols: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    instance_number: int | None
    series_description: str
    convolution_kernel: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    photometric: str
    samples_per_pixel: int
    has_pixels: bool
    encoding: PixelEncoding
    notes: tuple[str, ...] = ()
    member: str | None = None  # entry name when the file came from a zip
    frames: int = 1  # NumberOfFrames: Enhanced / multi-frame CT holds a whole series
    # Bytes of native (not encapsulated) pixel data in the file; None when unknown.
    pixel_bytes: int | None = None
    # Why the pixel-encoding tags cannot give HU (non-finite slope, BitsStored over
    # BitsAllocated, ...); empty when they can.
    encoding_problem: str = ""


def _first(value: Any) -> Any:
    """Multi-valued tags (RSNA's WindowCenter, some scanners' slope) → their first value."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def _float(ds: Dataset, keyword: str) -> float | None:
    value = _first(ds.get(keyword))
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    # "nan" and "inf" parse as floats; a position or spacing made of them is no position.
    return out if len(out) == n and all(np.isfinite(out)) else None


def _positive(value: Any) -> Any:
    """A spacing or thickness of zero or less is no spacing: treated as missing."""
    if value is None:
        return None
    return value if min(np.atleast_1d(value)) > 0 else None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _first(ds.get(keyword))
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _dcmread(source: str | Path | BinaryIO, header_only: bool, force: bool = False) -> Dataset:
    # Deferring large values (instead of stopping before PixelData) keeps a header read cheap
    # while still telling whether the object has pixels at all.
    return pydicom.dcmread(source, defer_size="2 KB" if header_only else None, force=force)


def read_dataset(
    source: str | Path | BinaryIO, *, name: str | None = None, header_only: bool = False
) -> Dataset:
    """dcmread with errors a user can act on. Accepts files without the 128-byte preamble
    (older archives have them) but rejects anything that does not parse as DICOM."""
    label = name or str(source)
    _check_inflated_size(source, label)
    with warnings.catch_warnings():
        # RSNA ids ("ID_abc") are not valid UIDs; pydicom warns on every access.
        warnings.simplefilter("ignore")
        try:
            ds = _dcmread(source, header_only)
        except InvalidDicomError:
            if hasattr(source, "seek"):
                source.seek(0)  # type: ignore[union-attr]
            if not _starts_like_raw_dicom(source):
                # Forcing pydicom through a large non-DICOM file (an archive, a video, zeros)
                # can take minutes; a preamble-less dataset starts with an early group tag.
                raise InputError(
                    label, "not a DICOM file (no DICM marker, no DICOM tag at the start)"
                ) from None
            try:
                ds = _dcmread(source, header_only, force=True)
            except Exception as exc:
                raise InputError(label, f"not a DICOM file ({exc})") from None
            if "SOPClassUID" not in ds and "PixelData" not in ds and "Modality" not in ds:
                raise InputError(label, "not a DICOM file (no DICOM header found)") from None
        except FileNotFoundError:
            raise InputError(label, "file not found") from None
        except IsADirectoryError:
            raise InputError(label, "is a folder, expected a DICOM file") from None
        except (EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise InputError(label, f"corrupt or truncated DICOM file ({exc})") from None
        except RecursionError:
            raise InputError(
                label, "corrupt DICOM file (sequences nested too deep to parse)"
            ) from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops quietly at the end of a file cut inside its header, which would
        # otherwise be reported as an object without pixels. Only this rare path pays.
        problem = _ends_early(ds, source)
        if problem:
            raise InputError(label, f"truncated DICOM file ({problem})")
    return ds


def _ends_early(ds: Dataset, source: str | Path | BinaryIO) -> str:
    """Why the file ends before its dataset does, or "" when the last element ends exactly
    at the end of the file (a complete object) or that cannot be told."""
    try:
        if hasattr(source, "seek"):
            here = source.tell()  # type: ignore[union-attr]
            size = source.seek(0, 2)  # type: ignore[union-attr]
            source.seek(here)  # type: ignore[union-attr]
        else:
            size = Path(source).stat().st_size
    except (OSError, ValueError):
        return ""
    elements = ds._dict  # raw elements keep their file offsets; converting them loses them
    if not elements:
        return f"no data element after the file meta header, {size} bytes"
    last = elements[max(elements)]
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return ""  # a converted or undefined-length last element: cannot tell
    if tell + length != size:
        return f"the file ends at byte {size}, inside the header, before any pixel data"
    return ""


def _check_inflated_size(source: str | Path | BinaryIO, label: str) -> None:
    """Refuse a Deflated Explicit VR dataset that inflates beyond MAX_INFLATED_BYTES, by
    inflating it once in chunks (and throwing the output away) before pydicom inflates it
    whole. Other syntaxes cost one 2 KB read."""
    try:
        if hasattr(source, "read"):
            start = source.tell()  # type: ignore[union-attr]
            fh: BinaryIO = source  # type: ignore[assignment]
        else:
            start = 0
            fh = open(source, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return  # let the real read report the problem
    try:
        head = fh.read(2048)
        if DEFLATED_SYNTAX.encode() not in head or head[128:132] != b"DICM":
            return
        # (0002,0000) UL group length right after the marker: the deflated body follows
        # the file meta group.
        if head[132:138] != b"\x02\x00\x00\x00UL" or len(head) < 144:
            return
        body = 144 + int.from_bytes(head[140:144], "little")
        fh.seek(start + body)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fh.read(1 << 20):
            total += len(inflater.decompress(chunk, 1 << 24))
            while inflater.unconsumed_tail and total <= MAX_INFLATED_BYTES:
                total += len(inflater.decompress(inflater.unconsumed_tail, 1 << 24))
            if total > MAX_INFLATED_BYTES or inflater.eof:
                break
        if total > MAX_INFLATED_BYTES:
            raise InputError(
                label,
                f"deflated DICOM inflates to more than {MAX_INFLATED_BYTES >> 20} MB "
                "(a compression bomb, or not a CT slice)",
            )
    except zlib.error as exc:
        raise InputError(label, f"corrupt deflated DICOM data ({exc})") from None
    finally:
        if fh is not source:
            fh.close()
        else:
            fh.seek(start)


def _starts_like_raw_dicom(source: str | Path | BinaryIO) -> bool:
    """True when the first tag is a low even group (0002 file meta, 0008 identification,
    ... up to 0028 image), as a dataset written without the 128-byte preamble starts."""
    try:
        if hasattr(source, "read"):
            head = source.read(4)  # type: ignore[union-attr]
            source.seek(0)  # type: ignore[union-attr]
        else:
            with open(source, "rb") as fh:
                head = fh.read(4)
    except OSError:
        return True  # let the real read report the problem
    if len(head) < 4:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[:2], order)
        if 0x0002 <= group <= 0x0028 and group % 2 == 0:
            return True
    return False


def header_from_dataset(
    ds: Dataset, path: str, member: str | None = None, *, geometry: bool = True
) -> SliceHeader:
    """Pull what series discovery and HU conversion need out of a parsed dataset.

    `geometry=False` reads only what turning pixels into HU needs (the training hot path:
    pydicom's per-tag conversion is a good part of a slice's cost), leaving positions, UIDs
    and descriptions empty."""
    notes: list[str] = []
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        syntax = "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
    slope = _fast_float(ds, "RescaleSlope")
    intercept = _fast_float(ds, "RescaleIntercept")
    if slope is None or intercept is None:
        notes.append(
            "no RescaleSlope/RescaleIntercept: assuming slope 1, intercept 0 (stored values are HU)"
        )
    photometric = _fast_text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    # MONOCHROME1 changes only the display, so a rescale still gives HU; without one the
    # stored values are display-inverted and must be flipped back.
    invert = photometric == "MONOCHROME1" and (slope is None or intercept is None)
    bits_allocated = _fast_us(ds, "BitsAllocated") or 16
    bits_stored = _fast_us(ds, "BitsStored") or bits_allocated
    representation = _fast_us(ds, "PixelRepresentation") or 0
    signed = representation == 1
    encoding_problem = _encoding_problem(
        bits_allocated, bits_stored, representation, slope, intercept
    )
    # RSNA 2019: some 12-bit unsigned images carry an intercept near 0 while their stored
    # values wrap at 4096; the top solutions shifted by 1000, unwrapped, and used -1000.
    # The fix is in slope-1 units: a mirrored 12-bit image (slope -1, intercept 3071) is valid.
    rsna_fix = (
        bits_stored == 12
        and not signed
        and slope in (None, 1)
        and intercept is not None
        and intercept > -100
    )
    slope = 1.0 if slope is None or slope == 0 else slope
    intercept = 0.0 if intercept is None else intercept
    if rsna_fix:
        notes.append(
            f"12-bit unsigned with RescaleIntercept {intercept:g}: "
            "applied the RSNA 2019 wrap fix (+1000, unwrap at 4096, intercept -1000)"
        )
    encoding = PixelEncoding(
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=signed,
        slope=slope,
        intercept=-1000.0 if rsna_fix else intercept,
        padding_value=_fast_us(ds, "PixelPaddingValue", signed),
        padding_limit=_fast_us(ds, "PixelPaddingRangeLimit", signed),
        rsna_wrap_fix=rsna_fix,
        invert=invert,
    )
    common: dict[str, Any] = {
        "path": path,
        "modality": _fast_text(ds, "Modality") or "",
        "rows": _fast_us(ds, "Rows") or 0,
        "cols": _fast_us(ds, "Columns") or 0,
        "transfer_syntax": syntax,
        "photometric": photometric,
        "samples_per_pixel": _fast_us(ds, "SamplesPerPixel") or 1,
        "frames": _frames(ds),
        "has_pixels": "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
        "pixel_bytes": _pixel_bytes(ds),
        "encoding_problem": encoding_problem,
        "encoding": encoding,
        "notes": tuple(notes),
        "member": member,
    }
    if not geometry:
        return SliceHeader(
            sop_uid="",
            sop_class="",
            study_uid="",
            series_uid="",
            patient_id="",
            position=None,
            orientation=None,
            pixel_spacing=None,
            slice_thickness=None,
            instance_number=None,
            series_description="",
            convolution_kernel="",
            image_type=(),
            **common,
        )
    return SliceHeader(
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class=str(ds.get("SOPClassUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        position=_floats(ds, "ImagePositionPatient", 3),
        orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_positive(_floats(ds, "PixelSpacing", 2)),  # type: ignore[arg-type]
        slice_thickness=_positive(_float(ds, "SliceThickness")),
        instance_number=_int(ds, "InstanceNumber"),
        series_description=str(ds.get("SeriesDescription", "")).strip(),
        convolution_kernel=_joined(ds.get("ConvolutionKernel")),
        image_type=tuple(_joined(ds.get("ImageType") or ()).upper().split("\\")),
        **common,
    )


def _encoding_problem(
    bits_allocated: int,
    bits_stored: int,
    representation: int,
    slope: float | None,
    intercept: float | None,
) -> str:
    """Why these pixel-encoding tags cannot give HU, or "" (garbage in them would otherwise
    give garbage HU silently)."""
    if bits_allocated not in (8, 16):
        return f"BitsAllocated {bits_allocated}: CT pixel data is 8 or 16 bits per value"
    if not 1 <= bits_stored <= bits_allocated:
        return f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}"
    if representation not in (0, 1):
        return f"PixelRepresentation {representation} (0 unsigned or 1 signed)"
    for name, value, limit in (("RescaleSlope", slope, 1e3), ("RescaleIntercept", intercept, 1e5)):
        if value is not None and not (np.isfinite(value) and abs(value) <= limit):
            return f"{name} {value:g} cannot map stored values to HU"
    return ""


def _pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native pixel data present, without loading a deferred value; None for
    encapsulated (compressed) data or no PixelData."""
    elem = ds.get_item("PixelData")
    if elem is None:
        return None
    if getattr(elem, "is_undefined_length", False):
        return None
    value = elem.value
    if value is None:
        # A raw element not read yet (deferred: pydicom defers only a value the file holds
        # in full) has a length; a converted one with no value is empty.
        length = getattr(elem, "length", 0)
        return None if length == 0xFFFFFFFF else int(length)
    return len(value) if isinstance(value, bytes | bytearray) else None


def _raw_bytes(ds: Dataset, keyword: str) -> tuple[bytes | None, str]:
    """(raw little-endian value bytes, VR) of a not-yet-converted element, or (None, "").
    Reading the few pixel-encoding tags this way skips pydicom's per-element conversion,
    which is a good part of the hot path's cost."""
    elem = ds.get_item(keyword)
    if elem is None or not isinstance(elem.value, bytes):
        return None, ""
    if ds.original_encoding[1] is not True:  # big endian or unknown: let pydicom convert
        return None, ""
    return elem.value, str(elem.VR)


def _fast_us(ds: Dataset, keyword: str, signed: bool = False) -> int | None:
    raw, vr = _raw_bytes(ds, keyword)
    if raw is None:
        return _int(ds, keyword)
    if len(raw) < 2:
        return None
    return int.from_bytes(raw[:2], "little", signed=signed or vr == "SS")


def _fast_text(ds: Dataset, keyword: str) -> str | None:
    raw, _ = _raw_bytes(ds, keyword)
    if raw is None:
        value = _first(ds.get(keyword))
        return None if value is None else str(value).strip()
    return raw.decode("ascii", "replace").split("\\")[0].strip(" \x00")


def _fast_float(ds: Dataset, keyword: str) -> float | None:
    text = _fast_text(ds, keyword)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _joined(value: Any) -> str:
    """A CS tag that may be single- or multi-valued, as one backslash-joined string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    return "\\".join(str(v).strip() for v in value)


def read_header(path: str | Path) -> SliceHeader:
    """Header only (no pixel data read): cheap enough to scan a whole folder or dataset."""
    ds = read_dataset(path, header_only=True)
    return header_from_dataset(ds, str(path))


def syntax_name(uid: str) -> str:
    try:
        return UID(uid).name
    except Exception:
        return uid


def _frames(ds: Dataset) -> int:
    value = _first(ds.get("NumberOfFrames"))
    try:
        return max(1, int(value)) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def check_ct_slice(header: SliceHeader, label: str, *, multi_frame: bool = False) -> None:
    """Reject what is not a single-frame greyscale CT image, with the reason
    (``multi_frame``: a reader that splits frames itself accepts several)."""
    if header.frames > 1 and not multi_frame:
        # Reading frame 1 alone would silently drop the rest of the series.
        raise InputError(
            label,
            f"multi-frame CT ({header.frames} frames, e.g. Enhanced CT): this reader takes one "
            "slice per file; `ichscan listen` accepts Enhanced CT, or export single-frame slices",
        )
    if not header.has_pixels:
        kind = header.modality or "unknown modality"
        raise InputError(label, f"no pixel data (a {kind} object, not an image)")
    if header.modality and header.modality != "CT":
        raise InputError(label, f"modality is {header.modality}, not CT")
    if header.samples_per_pixel != 1 or not header.photometric.startswith("MONOCHROME"):
        raise InputError(
            label, f"not a greyscale CT image (PhotometricInterpretation {header.photometric})"
        )
    if header.rows <= 0 or header.cols <= 0:
        raise InputError(label, "missing Rows/Columns")
    if header.encoding_problem:
        raise InputError(label, header.encoding_problem)
    if max(header.rows, header.cols) > MAX_CT_MATRIX:
        raise InputError(
            label,
            f"Rows x Columns {header.rows}x{header.cols}: larger than any CT image "
            f"(at most {MAX_CT_MATRIX} a side)",
        )
    if header.transfer_syntax in NATIVE_SYNTAXES and header.pixel_bytes is not None:
        problem = pixel_length_problem(header, header.pixel_bytes)
        if problem:
            raise InputError(label, problem)


def needed_pixel_bytes(header: SliceHeader) -> int:
    """Bytes of native pixel data that Rows x Columns x samples x frames take."""
    per_value = (header.encoding.bits_allocated + 7) // 8
    return header.rows * header.cols * header.samples_per_pixel * header.frames * per_value


def pixel_length_problem(header: SliceHeader, present: int) -> str:
    """Why ``present`` bytes of native pixel data do not fit Rows x Columns x frames, or "".
    A surplus of less than one row is tolerated (writers pad), as pydicom does."""
    per_value = (header.encoding.bits_allocated + 7) // 8
    needed = needed_pixel_bytes(header)
    if present == 0:
        return "empty pixel data"
    if present < needed:
        return f"truncated pixel data ({present} of {needed} bytes)"
    if present >= needed + header.cols * per_value:
        return (
            f"pixel data holds {present} bytes but Rows x Columns {header.rows}x{header.cols} "
            f"need {needed}: Rows/Columns do not match the pixel data"
        )
    return ""


@lru_cache(maxsize=64)
def hu_lookup_table(encoding: PixelEncoding) -> np.ndarray:
    """int16 HU for every possible stored value, indexed by the stored value's unsigned bits.

    Handles signedness (including sign bits below bit 15), the RSNA wrap fix, padding and
    out-of-field values (anything below air becomes air), and rounding of fractional slopes.
    """
    size = 1 << min(encoding.bits_allocated, 16)
    raw = np.arange(size, dtype=np.int64)
    bits = max(1, min(encoding.bits_stored, encoding.bits_allocated, 16))
    # Bits above BitsStored are not part of the value (PS3.5 8.1.1; overlays once lived
    # there), whether the decoder sign-extended into them or left garbage: mask, then take
    # bit BitsStored-1 as the sign of signed data. pydicom's pixel_array does the same, so
    # the native fast path and the decoded compressed path agree.
    values = raw & ((1 << bits) - 1)
    if encoding.signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    is_padding = np.zeros(size, dtype=bool)
    if encoding.padding_value is not None:
        lo = encoding.padding_value
        hi = encoding.padding_limit if encoding.padding_limit is not None else lo
        lo, hi = min(lo, hi), max(lo, hi)
        # A padding value may lie outside the stored bits (-2000 in a 12-bit unsigned
        # image): match it on the full allocated word too.
        word = np.where(raw >= size >> 1, raw - size, raw) if encoding.signed else raw
        is_padding = ((values >= lo) & (values <= hi)) | ((word >= lo) & (word <= hi))
    if encoding.rsna_wrap_fix:
        values = values + 1000
        values = np.where(values >= 4096, values - 4096, values)
    if encoding.invert:
        # Mirror within the stored range: 4095 - v for 12-bit unsigned, -1 - v for signed.
        low = -(1 << (bits - 1)) if encoding.signed else 0
        high = (1 << (bits - 1)) - 1 if encoding.signed else (1 << bits) - 1
        values = low + high - values
    hu = np.rint(values * encoding.slope + encoding.intercept)
    hu[is_padding] = AIR_HU
    hu = np.clip(hu, AIR_HU, np.iinfo(np.int16).max)
    return hu.astype(np.int16)


def stored_to_hu(stored: np.ndarray, encoding: PixelEncoding) -> np.ndarray:
    table = hu_lookup_table(encoding)
    if encoding.bits_allocated <= 8:
        return np.take(table, stored.astype(np.uint8))
    index = stored.view(np.uint16) if stored.dtype.itemsize == 2 else stored.astype(np.uint16)
    return np.take(table, index)


def decode_stored(ds: Dataset, header: SliceHeader, label: str) -> np.ndarray:
    """The stored pixel values as a [rows, cols] array (no rescale applied)."""
    syntax = header.transfer_syntax
    if syntax in NATIVE_SYNTAXES and header.encoding.bits_allocated == 16 and "PixelData" in ds:
        data = ds.PixelData or b""
        problem = pixel_length_problem(header, len(data))
        if problem:
            raise InputError(label, problem)
        dtype = "<i2" if header.encoding.signed else "<u2"
        return np.frombuffer(data, dtype=dtype, count=header.rows * header.cols).reshape(
            header.rows, header.cols
        )
    if syntax not in NATIVE_SYNTAXES:
        _require_decoder(syntax, label)
    elif not ds.get("PixelData"):
        raise InputError(label, "empty pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        raise InputError(
            label, f"cannot decode pixel data ({syntax_name(syntax)}): {one_line(exc)}"
        ) from None
    if arr.ndim != 2:
        raise InputError(label, f"expected one frame, got pixel array of shape {arr.shape}")
    return arr


def _require_decoder(syntax: str, label: str) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise MissingDecoderError(
            label, f"transfer syntax {syntax_name(syntax)} ({syntax}) is not supported"
        ) from None
    if not decoder.is_available:
        package = DECODER_PACKAGES.get(syntax, "a pydicom decoder plugin")
        raise MissingDecoderError(
            label,
            f"no decoder for {syntax_name(syntax)} ({syntax}); install {package}",
        )


def read_slice_hu(
    source: str | Path | bytes, *, name: str | None = None
) -> tuple[np.ndarray, SliceHeader]:
    """Read one CT slice: HU as int16 [rows, cols] and its header."""
    label = name or str(source)
    stream: str | Path | BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    ds = read_dataset(stream, name=label)
    header = header_from_dataset(ds, label)
    check_ct_slice(header, label)
    stored = decode_stored(ds, header, label)
    if stored.shape != (header.rows, header.cols):
        raise InputError(
            label,
            f"pixel array {stored.shape} does not match Rows/Columns {header.rows}x{header.cols}",
        )
    return stored_to_hu(stored, header.encoding), header
