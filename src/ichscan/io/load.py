"""`ichscan.load(path)`: one entry point for every input a user points ichscan at."""

from __future__ import annotations

from pathlib import Path

from ichscan.errors import InputError
from ichscan.io.archive import ZipLimits
from ichscan.io.image import IMAGE_SUFFIXES, read_image
from ichscan.io.nifti import read_nifti
from ichscan.io.series import Discovery, discover, refuse_special_file
from ichscan.io.volume import load_series
from ichscan.scan import Scan


def input_kind(path: str | Path) -> str:
    """'nifti', 'image' or 'dicom' (a file, a folder or a zip of DICOM)."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if Path(name).suffix in IMAGE_SUFFIXES:
        return "image"
    return "dicom"


def load(
    path: str | Path,
    *,
    series_uid: str | None = None,
    image_window: str = "unknown",
    zip_limits: ZipLimits | None = None,
    workers: int | None = None,
) -> Scan:
    """Read a head CT from a DICOM file, DICOM folder (recursive), zip of DICOM, NIfTI or
    PNG/JPEG slice. For DICOM the best series is chosen (see `ichscan info` for why) unless
    `series_uid` names one; files that could not be read are listed in `scan.warnings`."""
    path = Path(path)
    refuse_special_file(path)
    kind = input_kind(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "image":
        return read_image(path, window=image_window)
    found = discover(path, zip_limits)
    return load_discovered(found, series_uid=series_uid, workers=workers)


def load_discovered(
    found: Discovery, *, series_uid: str | None = None, workers: int | None = None
) -> Scan:
    if series_uid is not None:
        chosen = next((s for s in found.series if s.series_uid == series_uid), None)
        if chosen is None:
            raise InputError(found.source, f"no series with SeriesInstanceUID {series_uid}")
    else:
        chosen = found.selected
    if chosen is None:
        reasons = "; ".join(str(b) for b in found.bad_files[:3])
        more = f" (and {len(found.bad_files) - 3} more)" if len(found.bad_files) > 3 else ""
        raise InputError(found.source, f"no readable CT series: {reasons}{more}")
    scan = load_series(chosen, workers=workers, source=found.source)
    studies = {s.study_uid for s in found.series}
    patients = {s.patient_id for s in found.series}
    if len(studies) > 1 or len(patients) > 1:
        # Patients first: two patients in one input is the mix-up a reader must not miss.
        of_patients = f" of {len(patients)} patients" if len(patients) > 1 else ""
        # One scan was loaded out of another patient's too: the CLI exits 1 on it.
        scan.metadata["mixed_input"] = len(patients) > 1
        scan.warnings.append(
            f"{found.source} holds {len(studies)} {'study' if len(studies) == 1 else 'studies'}"
            f"{of_patients}; loaded patient {chosen.patient_id}, study {chosen.study_uid} "
            "(name a series: --series UID on the command line, series_uid= in Python; "
            "or point at one study's folder)"
        )
    scan.warnings.extend(f"skipped {b}" for b in found.bad_files)
    return scan
