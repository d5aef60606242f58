"""NIfTI volumes in and out, converting between NIfTI's RAS world and the Scan's DICOM
(LPS, [slice, row, column]) conventions through the affine, never by guessing flips."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ichscan.errors import InputError
from ichscan.scan import Scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti(path: str | Path) -> Scan:
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({exc})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) != 3:
        raise InputError(
            path, f"NIfTI has {len(shape)} dimensions {tuple(shape)}; expected one 3-D volume"
        )
    # Reorient to RAS+ voxel axes first; then one fixed permutation gives [slice, row, col]
    # with rows running anterior→posterior and columns right→left, as axial DICOM does.
    img = nib.as_closest_canonical(img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI voxel data ({exc})") from None
    nx, ny, _ = data.shape
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    warnings: list[str] = []
    if np.issubdtype(volume.dtype, np.floating):
        rounded = np.rint(volume)
        if np.allclose(volume, rounded) and rounded.min() >= -32768 and rounded.max() <= 32767:
            volume = rounded.astype(np.int16)
        else:
            volume = volume.astype(np.float32)
    elif volume.dtype != np.int16:
        if volume.min() < -32768 or volume.max() > 32767:
            raise InputError(path, f"voxel values {volume.min()}..{volume.max()} are not HU")
        volume = volume.astype(np.int16)
    if volume.size and volume.min() >= 0:
        warnings.append("no negative values: this does not look like a HU volume (air is -1000 HU)")
    # index (k, i, j) → RAS voxel (x, y, z) = (nx-1-j, ny-1-i, k)
    to_voxel = np.array(
        [[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    affine = LPS_TO_RAS @ img.affine @ to_voxel
    zooms = img.header.get_zooms()[:3]
    return Scan(
        hu=volume,
        affine=affine,
        slice_ids=[f"{_stem(path)}-{k:04d}" for k in range(volume.shape[0])],
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        patient_id=_stem(path),
        study_uid=_stem(path),
        series_uid=_stem(path),
        source=str(path),
        slice_thickness_mm=float(zooms[2]),
        metadata={"format": "nifti"},
        warnings=warnings,
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def write_nifti(scan: Scan, out: str | Path) -> Path:
    """Write the HU volume as int16 NIfTI with sform (exact, shear included) and qform."""
    if scan.windowed:
        raise InputError(
            scan.source, "holds windowed display values, not HU; refusing to write it as a HU NIfTI"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NIfTI voxel (x, y, z) = our (j, i, k); same world point, converted LPS → RAS.
    data = np.asarray(scan.hu).transpose(2, 1, 0)
    if data.dtype != np.int16:
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    to_index = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    affine = LPS_TO_RAS @ scan.affine @ to_index
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)  # scanner anatomical
    img.set_qform(affine, code=1, strip_shears=True)
    img.header["descrip"] = b"ichscan HU"
    nib.save(img, str(out))
    return out
