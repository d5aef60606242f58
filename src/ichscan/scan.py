"""The one in-memory currency of ichscan: a head CT as a volume of Hounsfield units.

Conventions (every reader produces them, every consumer relies on them):

- ``hu`` is ``[slices, rows, cols]``. For DICOM it is int16 HU; for NIfTI float32 or int16.
  When ``windowed`` is set, ``hu`` holds display values (uint8, 0-255) in the named window
  instead of HU — a PNG/JPEG slice is already windowed and must never be treated as HU.
- ``affine`` is a 4x4 float64 matrix that maps a voxel index in array order ``(k, i, j, 1)``
  (slice, row, column) to DICOM patient coordinates ``(x, y, z, 1)`` in mm, LPS
  (x towards the patient's left, y towards posterior, z towards the head). Column 0 is the
  step from one slice to the next (for a tilted gantry it is not perpendicular to the image
  plane), column 1 the step down one row, column 2 the step along one column, column 3 the
  centre of the first voxel.
- Slices are ordered by position along the image-plane normal, ascending (feet to head for
  a standard axial series), never by file name or InstanceNumber.
- ``spacing`` is ``(slice spacing, row spacing, column spacing)`` in mm; slice spacing is the
  distance between consecutive slice planes measured along the normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Scan:
    hu: np.ndarray
    affine: np.ndarray
    slice_ids: list[str]
    spacing: tuple[float, float, float]
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    source: str = ""
    windowed: str | None = None
    slice_thickness_mm: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Scan volume must be 3-D [slices, rows, cols], got {self.hu.shape}")
        if len(self.slice_ids) != self.hu.shape[0]:
            raise ValueError(
                f"{len(self.slice_ids)} slice ids for a volume of {self.hu.shape[0]} slices"
            )
        self.affine = np.asarray(self.affine, dtype=np.float64)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit normal of the image plane (row direction x column direction), LPS."""
        n = np.cross(self.affine[:3, 2], self.affine[:3, 1])
        return n / np.linalg.norm(n)

    @property
    def shear_deg(self) -> float:
        """Angle between the slice step and the image-plane normal: how far a tilted gantry
        shears the voxel grid (0 for an orthogonal grid, and after reslicing)."""
        step = self.affine[:3, 0]
        norm = np.linalg.norm(step)
        if norm == 0 or self.n_slices < 2:
            return 0.0
        cos = abs(float(np.dot(step / norm, self.slice_normal)))
        return float(np.degrees(np.arccos(min(1.0, cos))))
