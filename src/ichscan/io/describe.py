"""What `ichscan info` reports about an input: one entry per series (or volume, or image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ichscan.io.image import read_image
from ichscan.io.load import input_kind
from ichscan.io.nifti import read_nifti
from ichscan.io.series import discover, refuse_special_file
from ichscan.scan import Scan


def _volume_entry(scan: Scan, kind: str) -> dict[str, Any]:
    _, rows, cols = scan.shape
    return {
        "series_uid": scan.series_uid,
        "study_uid": scan.study_uid,
        "patient_id": scan.patient_id,
        "description": kind,
        "modality": "CT" if kind == "nifti" else "image",
        "n_slices": scan.n_slices,
        "rows": rows,
        "cols": cols,
        "pixel_spacing_mm": [scan.spacing[1], scan.spacing[2]],
        "slice_thickness_mm": scan.slice_thickness_mm,
        "slice_spacing_mm": scan.spacing[0] if scan.n_slices > 1 else None,
        "gantry_tilt_deg": round(scan.shear_deg, 2),
        "convolution_kernel": "",
        "transfer_syntax": kind.upper()
        if kind == "nifti"
        else Path(scan.source).suffix[1:].upper(),
        "transfer_syntax_uid": None,
        "selected": True,
        "selection_reason": "the only volume in the file",
        "problems": list(scan.warnings),
        "windowed": scan.windowed,
    }


def describe(path: str | Path) -> dict[str, Any]:
    """JSON-ready description: series, bad files, ignored files, notes."""
    refuse_special_file(Path(path))
    kind = input_kind(path)
    if kind == "nifti":
        return {
            "source": str(path),
            "format": kind,
            "series": [_volume_entry(read_nifti(path), kind)],
            "bad_files": [],
            "ignored_files": [],
            "notes": [],
        }
    if kind == "image":
        return {
            "source": str(path),
            "format": kind,
            "series": [_volume_entry(read_image(path), kind)],
            "bad_files": [],
            "ignored_files": [],
            "notes": [],
        }
    found = discover(path)
    return {
        "source": str(path),
        "format": "dicom",
        "series": [s.info() for s in found.series],
        "bad_files": [{"path": b.path, "reason": b.reason} for b in found.bad_files],
        "ignored_files": found.ignored_files,
        "notes": found.notes,
    }
