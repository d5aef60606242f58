"""Multi-frame CT (Enhanced CT, Legacy Converted Enhanced CT) as a Scan.

ichscan's series reader takes one slice per file; an enhanced object holds the whole stack
in one file, with each frame's position and pixel transformation in its functional groups
(per frame, or shared by all frames). Frames are ordered along the image-plane normal and
their geometry built as :mod:`ichscan.io.series` builds it for single-frame series, so the
model reads an enhanced series exactly as it would read the same slices one per file.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ichscan.errors import InputError
from ichscan.io.dicom import (
    check_ct_slice,
    header_from_dataset,
    read_dataset,
    stored_to_hu,
)
from ichscan.scan import Scan

FrameRef = tuple[str, int]  # (file, 1-based frame number)


def _group(ds: Dataset, frame: Dataset, keyword: str) -> Dataset | None:
    """A functional group macro for one frame: its own, else the shared one."""
    for source in (frame, _shared(ds)):
        if source is not None and keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def _shared(ds: Dataset) -> Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _floats(item: Dataset | None, keyword: str, n: int) -> tuple[float, ...] | None:
    if item is None or keyword not in item:
        return None
    value = item[keyword].value
    try:
        values = tuple(
            float(v) for v in (value if isinstance(value, list | MultiValue) else [value])
        )
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _frames(path: Path) -> list[dict[str, Any]]:
    """Each frame of one file: HU, position, orientation, pixel spacing, thickness."""
    label = str(path)
    ds = read_dataset(path, name=label)
    header = header_from_dataset(ds, label)
    check_ct_slice(header, label, multi_frame=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except Exception as exc:
        raise InputError(label, f"cannot decode the frames ({exc})") from None
    if stored.ndim == 2:
        stored = stored[None]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != len(stored):
        raise InputError(
            label, f"{len(stored)} frames but {len(per_frame)} per-frame functional groups"
        )
    out = []
    for n, (frame, pixels) in enumerate(zip(per_frame, stored, strict=True), start=1):
        position = _floats(_group(ds, frame, "PlanePositionSequence"), "ImagePositionPatient", 3)
        orientation = _floats(
            _group(ds, frame, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
        )
        measures = _group(ds, frame, "PixelMeasuresSequence")
        if position is None or orientation is None:
            raise InputError(label, f"frame {n} has no plane position or orientation")
        transform = _group(ds, frame, "PixelValueTransformationSequence")
        slope = _floats(transform, "RescaleSlope", 1) or (header.encoding.slope,)
        intercept = _floats(transform, "RescaleIntercept", 1) or (header.encoding.intercept,)
        encoding = dataclasses.replace(
            header.encoding, slope=slope[0] or 1.0, intercept=intercept[0]
        )
        thickness = _floats(measures, "SliceThickness", 1)
        out.append(
            {
                "ref": (label, n),
                "hu": stored_to_hu(pixels, encoding),
                "position": np.asarray(position),
                "orientation": np.asarray(orientation),
                "pixel_spacing": _floats(measures, "PixelSpacing", 2) or (1.0, 1.0),
                "thickness": thickness[0] if thickness else None,
                "ds": ds,
            }
        )
    return out


def load_multiframe(paths: list[Path], *, source: str = "") -> Scan:
    """The frames of one or more multi-frame CT files of one series as one Scan; frame
    ``k`` of the scan is ``metadata["frames"][k]`` = (file, frame number)."""
    frames = [f for path in paths for f in _frames(path)]
    first = frames[0]
    orientation = first["orientation"]
    if any(not np.allclose(f["orientation"], orientation, atol=1e-3) for f in frames):
        raise InputError(source or paths[0], "frames with different orientations")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    along = np.array([f["position"] @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    if len(frames) > 1 and np.any(np.diff(along) < 1e-3):
        raise InputError(source or paths[0], "two frames at the same position")
    positions = np.array([f["position"] for f in frames])
    step = np.median(np.diff(positions, axis=0), axis=0) if len(frames) > 1 else normal
    spacing = float(np.median(np.diff(along))) if len(frames) > 1 else 1.0
    px = first["pixel_spacing"]
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * px[0]
    affine[:3, 2] = row_dir * px[1]
    affine[:3, 3] = positions[0]
    ds = first["ds"]
    thickness = first["thickness"] or spacing
    return Scan(
        hu=np.stack([f["hu"] for f in frames]),
        affine=affine,
        slice_ids=[f"{Path(f['ref'][0]).stem}#{f['ref'][1]}" for f in frames],
        spacing=(spacing, float(px[0]), float(px[1])),
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        source=source or str(paths[0]),
        slice_thickness_mm=float(thickness),
        metadata={
            "format": "dicom",
            "modality": "CT",
            "slice_positions_mm": (along - along[0]).tolist(),
            "frames": [f["ref"] for f in frames],
        },
    )
