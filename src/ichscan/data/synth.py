"""Write synthetic head CT datasets in the layouts of the public datasets ichscan reads.

This is synthetic data for tests and demos: phantoms from :mod:`ichscan.data.phantom` written
as real files (DICOM series, NIfTI volumes, windowed PNG slices) in the folder layouts and
label formats of a plain DICOM export, the RSNA 2019 challenge, CQ500 and the RSNA PNG set,
with the ground truth of every scan and every slice beside them. It exercises readers,
adapters and the pipeline end to end; it is never a stand-in for real scans and says nothing
about how well a model does on them.

Every output folder holds:

- ``truth.csv``: one row per scan: ``scan, patient, study_uid, series_uid, path, seed,
  bleed_left, bleed_right, any`` and one 0/1 column per :data:`~ichscan.data.phantom.FINDINGS`
  key (the raw phantom findings; ``seed`` rebuilds the scan with ``make_phantom``;
  ``series_uid`` is empty for CQ500 patients, who have three series).
- ``slice_truth.csv`` (layouts with slices): ``scan, series_uid, sop_uid, slice_index, any``
  and one column per subtype; ``slice_index`` counts from the most inferior slice.
- ``README.txt``: says the data are synthetic.

Reader-style labels (``any``, the subtypes, the CSVs that mimic a dataset) count a chronic
subdural collection as ``subdural``, as the RSNA and CQ500 readers did; ``truth.csv`` keeps
``chronic`` apart as well.
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom import config as dicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DSfloat
from scipy import ndimage

from ichscan.data.phantom import (
    FINDINGS,
    LABELS,
    SUBTYPES,
    Phantom,
    label_mask,
    make_phantom,
    slice_labels,
)
from ichscan.io.dicom_write import COMPRESSIONS, write_ct_series
from ichscan.io.nifti import write_nifti
from ichscan.labels import CQ500_COLUMNS
from ichscan.scan import Scan

LAYOUTS = ("dicom", "nifti", "rsna", "cq500", "png")

# A head is about 150 mm from the skull base to the vertex; the default stack covers it with
# a slice to spare at either end. 230 mm is a typical head reconstruction field of view.
HEAD_HEIGHT_MM = 150.0
FIELD_OF_VIEW_MM = 230.0
DEFAULT_MATRIX = 256

CQ500_THIN_MM = 0.625
CQ500_FINDINGS = CQ500_COLUMNS
CQ500_READS_HEADER = (
    "name",
    "Category",
    *(f"R{reader}:{finding}" for reader in (1, 2, 3) for finding in CQ500_FINDINGS),
)
# Simulated readers miss a finding now and then and, more rarely, call one that is not there.
READER_MISS_RATE = 0.08
READER_FALSE_CALL_RATE = 0.015

TRUTH_HEADER = (
    "scan",
    "patient",
    "study_uid",
    "series_uid",
    "path",
    "seed",
    "bleed_left",
    "bleed_right",
    "any",
    *FINDINGS,
)
SLICE_TRUTH_HEADER = ("scan", "series_uid", "sop_uid", "slice_index", "any", *SUBTYPES)
LABELS_HEADER = ("id", "any", *SUBTYPES)

_BRAIN_WINDOW = (40.0, 80.0)
# The tags a de-identified RSNA 2019 challenge file keeps; everything else was stripped.
_RSNA_KEYWORDS = (
    "SOPInstanceUID",
    "Modality",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "WindowCenter",
    "WindowWidth",
    "RescaleIntercept",
    "RescaleSlope",
    "PixelData",
)


@dataclass
class _Written:
    """One scan as written: its truth row and its slice rows."""

    path: Path
    truth: dict[str, object]
    slices: list[dict[str, object]]


def write_synthetic(
    out: str | Path,
    *,
    n_scans: int = 1,
    seed: int = 0,
    layout: str = "dicom",
    thickness: float = 5.0,
    tilt_deg: float = 0.0,
    compression: str = "none",
    shape: tuple[int, int, int] | None = None,
    findings: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``n_scans`` synthetic head CTs to the fresh folder ``out`` in ``layout``.

    Layouts: ``dicom`` (``OUT/<patient>/<series>/`` DICOM series), ``nifti``
    (``OUT/<scan>.nii.gz`` + ``OUT/<scan>_mask.nii.gz`` label map + ``labels.csv``), ``rsna``
    (``OUT/stage_2_train/ID_*.dcm`` + ``stage_2_train.csv``), ``cq500``
    (``OUT/CQ500CT<n> CQ500CT<n>/Unknown Study/CT <desc>/CT000000.dcm`` + ``reads.csv`` from
    three simulated readers) and ``png`` (``OUT/images/<id>.png`` + ``labels.csv``).

    ``shape`` is ``(slices, rows, cols)`` of the main series; by default it covers the head at
    ``thickness`` mm on a 256 x 256 matrix over a 230 mm field of view (32 slices at 5 mm).
    ``tilt_deg`` and ``compression`` go to the DICOM writer (``tilt_deg`` also shears the
    NIfTI affine). ``findings`` fixes the findings of every scan; by default each scan draws
    its own from its seed (about half are normal).

    Returns one path per scan: the series folder (``dicom``), the NIfTI volume, the most
    inferior slice (``rsna``, whose slices share one folder), the patient folder
    (``cq500``) or the PNG image.
    """
    out = Path(out)
    _check_arguments(out, n_scans, seed, layout, thickness, tilt_deg, compression, shape)
    if shape is None:
        slices = math.ceil(HEAD_HEIGHT_MM / thickness) + 2
        shape = (slices, DEFAULT_MATRIX, DEFAULT_MATRIX)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing = (float(thickness), FIELD_OF_VIEW_MM / shape[1], FIELD_OF_VIEW_MM / shape[2])
    out.mkdir(parents=True, exist_ok=True)
    writer = {
        "dicom": _write_dicom,
        "nifti": _write_nifti,
        "rsna": _write_rsna,
        "cq500": _write_cq500,
        "png": _write_png,
    }[layout]
    # Built one at a time as the writer goes, so memory stays flat however many scans.
    scans = (
        make_phantom(shape, spacing, seed=_scan_seed(seed, i), findings=findings, tilt_deg=tilt_deg)
        for i in range(n_scans)
    )
    written = writer(out, scans, seed=seed, tilt_deg=tilt_deg, compression=compression)
    _write_csv(out / "truth.csv", TRUTH_HEADER, [w.truth for w in written])
    if layout != "png":
        rows = [row for w in written for row in w.slices]
        _write_csv(out / "slice_truth.csv", SLICE_TRUTH_HEADER, rows)
    _write_readme(out, layout, n_scans, seed)
    return [w.path for w in written]


# -- layouts ------------------------------------------------------------------------------


def _write_dicom(
    out: Path, scans: Iterable[Phantom], *, seed: int, tilt_deg: float, compression: str
) -> list[_Written]:
    written = []
    for i, phantom in enumerate(scans):
        patient = f"SYNTH{i:04d}"
        scan_id = f"synth-{i:04d}"
        study_uid = _uid(seed, i, "study")
        series_uid = _uid(seed, i, "series")
        folder = out / patient / f"001-head-{phantom.spacing[0]:g}mm"
        paths = write_ct_series(
            phantom.hu,
            folder,
            pixel_spacing=(phantom.spacing[1], phantom.spacing[2]),
            slice_spacing=phantom.spacing[0],
            tilt_deg=tilt_deg,
            patient_id=patient,
            patient_name=f"Synthetic^{patient}",
            study_uid=study_uid,
            series_uid=series_uid,
            series_description=f"Head {phantom.spacing[0]:g}mm (synthetic)",
            compression=compression,
            seed=phantom.seed,
        )
        ids = [p.stem for p in paths]
        truth = _truth_row(phantom, scan_id, patient, study_uid, series_uid, folder, out)
        written.append(_Written(folder, truth, _slice_rows(phantom, scan_id, series_uid, ids)))
    return written


def _write_nifti(
    out: Path, scans: Iterable[Phantom], *, seed: int, tilt_deg: float, compression: str
) -> list[_Written]:
    written = []
    label_rows = []
    for i, phantom in enumerate(scans):
        scan_id = f"synth-{i:04d}"
        ids = [f"{scan_id}-{k:04d}" for k in range(phantom.shape[0])]
        scan = Scan(
            hu=phantom.hu,
            affine=_affine(phantom.shape, phantom.spacing, tilt_deg),
            slice_ids=ids,
            spacing=phantom.spacing,
            patient_id=scan_id,
            study_uid=scan_id,
            series_uid=scan_id,
            source="synthetic",
        )
        path = write_nifti(scan, out / f"{scan_id}.nii.gz")
        _write_label_map(phantom, path, out / f"{scan_id}_mask.nii.gz")
        labels = _scan_labels(phantom)
        label_rows.append({"id": scan_id, **labels})
        truth = _truth_row(phantom, scan_id, scan_id, scan_id, scan_id, path, out)
        written.append(_Written(path, truth, _slice_rows(phantom, scan_id, scan_id, ids)))
    _write_csv(out / "labels.csv", LABELS_HEADER, label_rows)
    return written


def _write_rsna(
    out: Path, scans: Iterable[Phantom], *, seed: int, tilt_deg: float, compression: str
) -> list[_Written]:
    """One folder of slices from every study, named by a random-looking SOP "UID"
    (``ID_<9 hex>``), and the challenge CSV with six rows per image in challenge order."""
    rng = np.random.default_rng([seed, 7001])
    ids = _HexIds(rng)
    images = out / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    written = []
    csv_rows: list[dict[str, object]] = []
    for phantom in scans:
        patient, study_uid, series_uid = ids.new(8), ids.new(10), ids.new(10)
        # The challenge data mixes 16-bit signed and 12-bit unsigned storage.
        storage = "int16" if rng.random() < 0.5 else "uint12"
        image_ids = [ids.new(9) for _ in range(phantom.shape[0])]
        with tempfile.TemporaryDirectory(prefix=".synth-", dir=out) as tmp:
            paths = write_ct_series(
                phantom.hu,
                tmp,
                pixel_spacing=(phantom.spacing[1], phantom.spacing[2]),
                slice_spacing=phantom.spacing[0],
                tilt_deg=tilt_deg,
                compression=compression,
                storage=storage,
                seed=phantom.seed,
            )
            for path, image_id in zip(paths, image_ids, strict=True):
                ds = _rsna_dataset(
                    pydicom.dcmread(path),
                    image_id=image_id,
                    patient=patient,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    media_uid="9999." + "".join(str(d) for d in rng.integers(0, 10, 39)),
                    multi_window=storage == "uint12",
                )
                # Written as is: enforcing the file format would overwrite the media storage
                # UID with the SOPInstanceUID, and the challenge files have them differ.
                ds.save_as(images / f"{image_id}.dcm", enforce_file_format=False)
        labels = slice_labels(phantom)
        for k, image_id in enumerate(image_ids):
            csv_rows.extend(
                {"ID": f"{image_id}_{name}", "Label": int(labels[name][k])} for name in LABELS
            )
        first = images / f"{image_ids[0]}.dcm"
        truth = _truth_row(phantom, study_uid, patient, study_uid, series_uid, first, out)
        written.append(
            _Written(first, truth, _slice_rows(phantom, study_uid, series_uid, image_ids))
        )
    # The challenge CSV is not grouped by study: shuffle whole images (six rows each).
    blocks = [csv_rows[k : k + len(LABELS)] for k in range(0, len(csv_rows), len(LABELS))]
    order = rng.permutation(len(blocks))
    shuffled = [row for k in order for row in blocks[k]]
    _write_csv(out / "stage_2_train.csv", ("ID", "Label"), shuffled)
    return written


def _write_cq500(
    out: Path, scans: Iterable[Phantom], *, seed: int, tilt_deg: float, compression: str
) -> list[_Written]:
    """Per patient a thick series and two thin ones (soft tissue and bone kernel), as the
    CQ500 scans come; the thin ones span the same slab on half the in-plane matrix, which
    keeps them small."""
    rng = np.random.default_rng([seed, 7002])
    written = []
    reads = []
    for i, thick in enumerate(scans):
        name = f"CQ500-CT-{i}"
        patient_dir = out / f"CQ500CT{i} CQ500CT{i}"
        study = patient_dir / "Unknown Study"
        study_uid = _uid(seed, i, "study")
        thin = _thin_twin(thick)
        bone = _bone_kernel(thin.hu)
        series = [
            (f"{thick.spacing[0]:g}mm", thick, thick.hu, "STANDARD"),
            ("PLAIN THIN", thin, thin.hu, "STANDARD"),
            ("BONE THIN", thin, bone, "BONE"),
        ]
        slices: list[dict[str, object]] = []
        for number, (description, phantom, hu, kernel) in enumerate(series, start=1):
            series_uid = _uid(seed, i, f"series{number}")
            folder = study / f"CT {description}"
            paths = write_ct_series(
                hu,
                folder,
                pixel_spacing=(phantom.spacing[1], phantom.spacing[2]),
                slice_spacing=phantom.spacing[0],
                tilt_deg=tilt_deg,
                patient_id=name,
                patient_name=name,
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=number,
                series_description=description,
                convolution_kernel=kernel,
                compression=compression,
                seed=phantom.seed + number,
            )
            # Written as <SOPInstanceUID>.dcm, then renamed the CQ500 way, in spatial order.
            ids = [p.stem for p in paths]
            for k, path in enumerate(paths):
                path.rename(folder / f"CT{k:06d}.dcm")
            slices.extend(_slice_rows(phantom, name, series_uid, ids))
        truth = _truth_row(thick, name, name, study_uid, "", patient_dir, out)
        written.append(_Written(patient_dir, truth, slices))
        reads.append(_cq500_reads(name, thick, rng))
    _write_csv(out / "reads.csv", CQ500_READS_HEADER, reads)
    return written


def _write_png(
    out: Path, scans: Iterable[Phantom], *, seed: int, tilt_deg: float, compression: str
) -> list[_Written]:
    """One brain-window slice per scan, named like the RSNA PNG set; the labels are those of
    that slice."""
    ids = _HexIds(np.random.default_rng([seed, 7003]))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    for i, phantom in enumerate(scans):
        image_id = ids.new(9)
        k = representative_slice(phantom)
        path = images / f"{image_id}.png"
        Image.fromarray(_window(phantom.hu[k], *_BRAIN_WINDOW), mode="L").save(path)
        labels = slice_labels(phantom)
        row = {"id": image_id, **{name: int(labels[name][k]) for name in ("any", *SUBTYPES)}}
        rows.append(row)
        truth = _truth_row(phantom, image_id, f"SYNTH{i:04d}", "", "", path, out)
        written.append(_Written(path, truth, []))
    _write_csv(out / "labels.csv", LABELS_HEADER, rows)
    return written


def representative_slice(phantom: Phantom) -> int:
    """The slice a reader would show: the one with the most blood among the slices labelled
    positive, or for a normal scan the slice nearest the lateral ventricles (12 mm above
    the centre of the head)."""
    labels = slice_labels(phantom)
    if labels["any"].any():
        area = label_mask(phantom, "any").sum(axis=(1, 2))
        return int(np.argmax(np.where(labels["any"], area, -1)))
    centre = (phantom.shape[0] - 1) / 2 + 12.0 / phantom.spacing[0]
    return int(np.clip(round(centre), 0, phantom.shape[0] - 1))


# -- truth --------------------------------------------------------------------------------


def _scan_labels(phantom: Phantom) -> dict[str, int]:
    labels = slice_labels(phantom)
    return {name: int(labels[name].any()) for name in ("any", *SUBTYPES)}


def _bleed_sides(phantom: Phantom) -> tuple[bool, bool]:
    sides = [phantom.sides[name] for name in (*SUBTYPES, "chronic") if name in phantom.sides]
    return (
        any(s in ("left", "both") for s in sides),
        any(s in ("right", "both") for s in sides),
    )


def _truth_row(
    phantom: Phantom,
    scan: str,
    patient: str,
    study_uid: str,
    series_uid: str,
    path: Path,
    root: Path,
) -> dict[str, object]:
    left, right = _bleed_sides(phantom)
    return {
        "scan": scan,
        "patient": patient,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "path": path.relative_to(root).as_posix(),
        "seed": phantom.seed,
        "bleed_left": int(left),
        "bleed_right": int(right),
        "any": _scan_labels(phantom)["any"],
        **{name: int(phantom.findings[name]) for name in FINDINGS},
    }


def _slice_rows(
    phantom: Phantom, scan: str, series_uid: str, sop_uids: Sequence[str]
) -> list[dict[str, object]]:
    labels = slice_labels(phantom)
    return [
        {
            "scan": scan,
            "series_uid": series_uid,
            "sop_uid": sop_uid,
            "slice_index": k,
            **{name: int(labels[name][k]) for name in ("any", *SUBTYPES)},
        }
        for k, sop_uid in enumerate(sop_uids)
    ]


def _cq500_reads(name: str, phantom: Phantom, rng: np.random.Generator) -> dict[str, object]:
    """Three readers' calls on one scan: the truth, each call flipped now and then, made
    consistent the way the real reads are (ICH when any bleed is called, a side only for a
    bleed, a fracture when a calvarial one is called, a shift only with mass effect)."""
    f = phantom.findings
    left, right = _bleed_sides(phantom)
    truth = {
        "IPH": f["intraparenchymal"],
        "IVH": f["intraventricular"],
        "SDH": f["subdural"] or f["chronic"],
        "EDH": f["epidural"],
        "SAH": f["subarachnoid"],
        "BleedLocation-Left": left,
        "BleedLocation-Right": right,
        "ChronicBleed": f["chronic"],
        "CalvarialFracture": f["fracture"],
        "OtherFracture": False,
        "MassEffect": f["mass_effect"],
        "MidlineShift": f["midline_shift"],
    }
    positive = any(truth.values())
    row: dict[str, object] = {
        "name": name,
        # CQ500's two batches: B2 was enriched for bleeds, B1 is closer to a plain sample.
        "Category": ("B2" if rng.random() < 0.8 else "B1")
        if positive
        else ("B1" if rng.random() < 0.6 else "B2"),
    }
    for reader in (1, 2, 3):
        call = {}
        for key, value in truth.items():
            flip = rng.random() < (READER_MISS_RATE if value else READER_FALSE_CALL_RATE)
            call[key] = bool(value) != flip
        call["OtherFracture"] = False
        bleed = any(call[k] for k in ("IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed"))
        call["ICH"] = bleed
        if not bleed:
            call["BleedLocation-Left"] = call["BleedLocation-Right"] = False
        call["Fracture"] = call["CalvarialFracture"] or call["OtherFracture"]
        call["MassEffect"] = call["MassEffect"] or call["MidlineShift"]
        row.update({f"R{reader}:{k}": int(call[k]) for k in CQ500_FINDINGS})
    return row


# -- helpers ------------------------------------------------------------------------------


def _check_arguments(
    out: Path,
    n_scans: int,
    seed: int,
    layout: str,
    thickness: float,
    tilt_deg: float,
    compression: str,
    shape: tuple[int, int, int] | None,
) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if n_scans < 1:
        raise ValueError(f"n_scans must be at least 1, got {n_scans}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not thickness > 0:
        raise ValueError(f"thickness must be positive, got {thickness}")
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}"
        )
    if layout in ("nifti", "png") and compression != "none":
        raise ValueError(f"compression applies to DICOM layouts, not {layout}")
    if layout == "png" and tilt_deg != 0:
        raise ValueError("tilt_deg has no meaning for single PNG slices")
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Ground truth from two runs must never mix in one folder.
        raise FileExistsError(f"{out} exists and is not an empty folder")


def _scan_seed(seed: int, index: int) -> int:
    """Each scan's own phantom seed: independent streams, reproducible from (seed, index)."""
    return int(np.random.default_rng([seed, index]).integers(0, 2**31 - 1))


def _uid(seed: int, index: int, what: str) -> str:
    # Derived from the arguments, so the same call writes the same study and series UIDs.
    return str(generate_uid(entropy_srcs=["ichscan-synthetic", str(seed), str(index), what]))


class _HexIds:
    """RSNA-style ``ID_<hex>`` identifiers, unique within one output."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._seen: set[str] = set()

    def new(self, digits: int) -> str:
        while True:
            value = "ID_" + "".join(f"{d:x}" for d in self._rng.integers(0, 16, digits))
            if value not in self._seen:
                self._seen.add(value)
                return value


def _rsna_dataset(
    source: Dataset,
    *,
    image_id: str,
    patient: str,
    study_uid: str,
    series_uid: str,
    media_uid: str,
    multi_window: bool,
) -> Dataset:
    """The slice as the challenge shipped it: only the RSNA tags, ``ID_`` strings where UIDs
    were (not valid UIDs, which is the point), multi-valued window tags on 12-bit files."""
    ds = Dataset()
    for keyword in _RSNA_KEYWORDS:
        if keyword in source:
            ds[keyword] = source[keyword]
    # The ID_ strings break the UI value rules; RSNA shipped them anyway. IGNORE keeps pydicom
    # from warning about every one while writing.
    for tag, value in (
        (0x00080018, image_id),
        (0x0020000D, study_uid),
        (0x0020000E, series_uid),
    ):
        ds[tag] = DataElement(tag, "UI", value, validation_mode=dicom_config.IGNORE)
    ds.PatientID = patient
    ds.StudyID = ""
    if multi_window:
        ds.WindowCenter = [DSfloat("00040"), DSfloat("00040")]
        ds.WindowWidth = [DSfloat("00080"), DSfloat("00080")]
    ds.preamble = b"\x00" * 128
    ds.file_meta = source.file_meta
    ds.file_meta.MediaStorageSOPInstanceUID = media_uid
    return ds


def _affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], tilt_deg: float
) -> np.ndarray:
    """Voxel (slice, row, col) to LPS mm, centred on the volume, with the gantry tilt laid
    out as write_ct_series lays it out."""
    tilt = math.radians(tilt_deg)
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, spacing[0] / math.cos(tilt)]
    affine[:3, 1] = [0.0, spacing[1] * math.cos(tilt), -spacing[1] * math.sin(tilt)]
    affine[:3, 2] = [spacing[2], 0.0, 0.0]
    centre = (np.array(shape, dtype=np.float64) - 1) / 2
    affine[:3, 3] = -(affine[:3, :3] @ centre)
    return affine


def _write_label_map(phantom: Phantom, volume_path: Path, out: Path) -> Path:
    """The subtypes as a uint8 label map (0 background, 1..5 in SUBTYPES order) on exactly
    the volume's grid: header and affine are copied from the volume just written."""
    labels = np.zeros(phantom.shape, dtype=np.uint8)
    for value, name in enumerate(SUBTYPES, start=1):
        labels[label_mask(phantom, name)] = value
    volume = nib.load(str(volume_path))
    header = volume.header.copy()
    header.set_data_dtype(np.uint8)
    header["descrip"] = b"ichscan labels: 1..5 = " + ",".join(s[:3] for s in SUBTYPES).encode()
    img = nib.Nifti1Image(labels.transpose(2, 1, 0), volume.affine, header=header)
    img.set_sform(volume.header.get_sform(), code=int(volume.header["sform_code"]))
    img.set_qform(volume.header.get_qform(), code=int(volume.header["qform_code"]))
    nib.save(img, str(out))
    return out


def _thin_twin(thick: Phantom) -> Phantom:
    """The same head (same seed and findings) on 0.625 mm slices spanning the same slab,
    on half the in-plane matrix."""
    n, rows, cols = thick.shape
    n_thin = max(2, round((n - 1) * thick.spacing[0] / CQ500_THIN_MM) + 1)
    step = (n - 1) * thick.spacing[0] / (n_thin - 1) if n > 1 else CQ500_THIN_MM
    shape = (n_thin, max(1, rows // 2), max(1, cols // 2))
    spacing = (step, thick.spacing[1] * rows / shape[1], thick.spacing[2] * cols / shape[2])
    present = [name for name, value in thick.findings.items() if value]
    return make_phantom(
        shape,
        spacing,
        seed=thick.seed,
        findings=present,
        pose_deg=thick.pose_deg,
        tilt_deg=thick.tilt_deg,
    )


def _bone_kernel(hu: np.ndarray) -> np.ndarray:
    """A sharp reconstruction kernel in caricature: edges and noise boosted."""
    soft = hu.astype(np.float32)
    blurred = ndimage.uniform_filter(soft, size=(1, 3, 3))
    sharp = soft + 1.5 * (soft - blurred)
    return np.clip(np.rint(sharp), -1024, 3071).astype(np.int16)


def _window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    low = centre - width / 2
    scaled = (hu.astype(np.float32) - low) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[dict[str, object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


SYNTHETIC_MARK = "SYNTHETIC DATA - not from any patient."


def is_synthetic(root: str | Path) -> bool:
    """True for a folder ``write_synthetic`` wrote (its README.txt says so first), so that
    what a model was trained on can say it."""
    readme = Path(root) / "README.txt"
    try:
        with readme.open(encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == SYNTHETIC_MARK
    except OSError:
        return False


def _write_readme(out: Path, layout: str, n_scans: int, seed: int) -> None:
    (out / "README.txt").write_text(
        SYNTHETIC_MARK + "\n\n"
        f"{n_scans} phantom head CT scan(s) written by ichscan in the '{layout}' layout "
        f"(seed {seed}) for tests and demos. They are cartoons with known ground truth\n"
        "(truth.csv per scan, slice_truth.csv per slice) and must never stand in for real\n"
        "scans in any reported figure.\n"
    )
