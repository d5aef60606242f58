"""NIfTI volumes in and out, converting between NIfTI's RAS world and the Scan's DICOM
(LPS, [slice, row, column]) conventions through the affine, never by guessing flips."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ichscan.errors import InputError, one_line
from ichscan.io.dicom import AIR_HU
from ichscan.scan import Scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The largest head CT worth reading: 1024x1024x512 or 512x512x2048 voxels, 1 GiB as int16.
# A header claiming more is damaged or a bomb (a few kB of .nii.gz can claim 16 GB of
# zeros); it is refused before any voxel is read or any array allocated.
MAX_VOXELS = 512 * 1024 * 1024
# And in bytes as stored: the voxel cap alone lets float64 through at 4 GiB, which a small
# gzip of zeros can hold. 2 GiB keeps a 512 x 512 x 1000 float64 volume.
MAX_VOXEL_BYTES = 2 << 30
_GREY_KINDS = "biuf"  # bool, signed, unsigned, floating: one intensity per voxel
NO_NUMBER = "no voxel holds a number (all are NaN or infinite)"


def read_nifti(path: str | Path) -> Scan:
    """One 3-D NIfTI volume as a Scan of HU. The header is checked before any voxel is read
    (size, voxel type, affine); NaN or infinite voxels are read as air, with a warning."""
    path = Path(path)
    img = open_nifti(path)  # one volume, perhaps as [x, y, z, 1]: dropped once read
    # Reorient to RAS+ voxel axes first; then one fixed permutation gives [slice, row, col]
    # with rows running anterior→posterior and columns right→left, as axial DICOM does.
    try:
        img = nib.as_closest_canonical(img)
    except (nib.orientations.OrientationError, np.linalg.LinAlgError, ValueError) as exc:
        raise InputError(
            path, f"cannot orient the volume from its affine ({one_line(exc)})"
        ) from None
    try:
        data = np.asanyarray(img.dataobj)
    except MemoryError:
        raise InputError(
            path, f"not enough memory to read {_shape_text(img.shape)} voxels"
        ) from None
    except Exception as exc:
        raise InputError(path, f"cannot read NIfTI voxel data ({one_line(exc)})") from None
    if data.ndim == 4:
        data = data[..., 0]
    nx, ny, _ = data.shape
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    warnings: list[str] = []
    volume = _to_hu_dtype(path, volume, warnings)
    if volume.min() >= 0:
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


def open_nifti(path: str | Path, *, keep_file_open: bool | None = None) -> nib.Nifti1Image:
    """The image with its header parsed and checked (:func:`check_nifti_header`); nibabel
    reads no voxel until asked. For readers that take the volume a slice at a time (the
    dataset adapter, `prepare`): they refuse what `read_nifti` refuses, the same way.
    `keep_file_open` is passed to nibabel (True keeps a .nii.gz stream open between reads)."""
    path = Path(path)
    try:
        img = nib.load(str(path), keep_file_open=keep_file_open)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except MemoryError:
        raise InputError(path, "not a readable NIfTI file (not enough memory)") from None
    except Exception as exc:
        raise InputError(path, f"not a readable NIfTI file ({one_line(exc)})") from None
    check_nifti_header(img, path)
    return img


def check_nifti_header(img: nib.Nifti1Image, path: str | Path) -> None:
    """Refuse, from the header alone, what cannot be a head CT volume: not one 3-D volume
    (a 4-D file holding one volume is one), no voxels or more than MAX_VOXELS, a voxel type
    that is not one real intensity, an affine that is not finite or is singular. Raises an
    InputError naming `path`."""
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise InputError(
            path, f"NIfTI has {len(shape)} dimensions {tuple(shape)}; expected one 3-D volume"
        )
    if min(shape) < 0:
        raise InputError(
            path, f"header declares a negative dimension: {_shape_text(shape)}; damaged file"
        )
    n_voxels = int(np.prod(img.shape, dtype=np.int64))
    if n_voxels == 0:
        raise InputError(path, f"NIfTI volume {_shape_text(img.shape)} holds no voxels")
    if n_voxels > MAX_VOXELS:
        raise InputError(
            path,
            f"header declares {_shape_text(img.shape)} voxels ({n_voxels:.2g}), more than a "
            f"head CT holds (at most {MAX_VOXELS:.2g}); damaged or crafted file, not read",
        )
    dtype = img.get_data_dtype()
    if dtype.kind not in _GREY_KINDS:
        kind = _nifti_type(img)
        if dtype.kind == "c":
            raise InputError(path, f"voxel type {kind} holds complex numbers, not HU")
        raise InputError(
            path, f"voxel type {kind} is not a greyscale intensity; expected one HU per voxel"
        )
    if n_voxels * dtype.itemsize > MAX_VOXEL_BYTES:
        raise InputError(
            path,
            f"header declares {_shape_text(img.shape)} voxels of {dtype.itemsize} bytes "
            f"({n_voxels * dtype.itemsize / 2**30:.1f} GiB), more than the "
            f"{MAX_VOXEL_BYTES >> 30} GiB a volume may take; damaged or crafted file, not read",
        )
    _check_affine(path, img.affine)
    _check_length(path, img, n_voxels * dtype.itemsize)


def _check_length(path: str | Path, img: nib.Nifti1Image, n_bytes: int) -> None:
    """An uncompressed file must hold the voxel bytes its header declares (a compressed one
    can only tell by decompressing: its reads fail later, one line each)."""
    name = img.file_map["image"].filename
    offset = getattr(img.dataobj, "offset", None)
    if not (
        isinstance(name, str) and name.lower().endswith((".nii", ".img")) and offset is not None
    ):
        return
    try:
        held = Path(name).stat().st_size - int(offset)
    except OSError:
        return  # not there to measure: the read will say what is wrong
    if held < n_bytes:
        raise InputError(
            path,
            f"cannot read NIfTI voxel data (file is truncated: {max(held, 0)} of {n_bytes} "
            "voxel data bytes)",
        )


def _check_affine(path: str | Path, affine: np.ndarray) -> None:
    """The voxel-to-world matrix must place every voxel somewhere, each axis its own way."""
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine is not finite (NaN or infinite values in sform/qform)")
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    # |det| against the product of the voxel sizes: 0 when an axis is zero or two are
    # parallel, 1 for any rotation; tiny voxels alone do not make it small.
    if sizes.min() <= 0 or abs(np.linalg.det(axes)) < 1e-6 * float(np.prod(sizes)):
        raise InputError(
            path, "affine is singular (a zero voxel size or two axes along one direction)"
        )


def _to_hu_dtype(path: Path, volume: np.ndarray, warnings: list[str]) -> np.ndarray:
    """int16 when every value is a whole number in range, float32 otherwise."""
    if np.issubdtype(volume.dtype, np.floating):
        volume = _finite(path, volume, warnings)
        rounded = np.rint(volume)
        if np.allclose(volume, rounded) and rounded.min() >= -32768 and rounded.max() <= 32767:
            return rounded.astype(np.int16)
        return volume.astype(np.float32)
    if volume.dtype != np.int16:
        if volume.min() < -32768 or volume.max() > 32767:
            raise InputError(path, f"voxel values {volume.min()}..{volume.max()} are not HU")
        return volume.astype(np.int16)
    return volume


def _finite(path: Path, volume: np.ndarray, warnings: list[str]) -> np.ndarray:
    """NaN or Inf voxels become air, as DICOM padding does: resampling tools write NaN
    outside the field of view. A volume with no number at all is refused."""
    if not np.isfinite(volume).any():
        raise InputError(path, NO_NUMBER)
    volume, n_bad = nonfinite_to_air(volume)
    if n_bad:
        warnings.append(f"{n_bad} voxel(s) are NaN or infinite; read as air ({AIR_HU} HU)")
    return volume


def nonfinite_to_air(values: np.ndarray) -> tuple[np.ndarray, int]:
    """NaN or infinite voxels set to air (AIR_HU), and how many there were; `values` itself
    when all are finite. Per slice or per volume: refusing a volume with no number at all
    is the caller's part (see `has_a_number`)."""
    finite = np.isfinite(values)
    if finite.all():
        return values, 0
    n_bad = int(finite.size - np.count_nonzero(finite))
    return np.where(finite, values, np.asarray(AIR_HU, dtype=values.dtype)), n_bad


def has_a_number(img: nib.Nifti1Image, path: str | Path) -> None:
    """Refuse a volume whose every voxel is NaN or infinite, as `read_nifti` does, reading
    it a plane at a time along its last axis (the file order, so a .nii.gz is decompressed
    once) and stopping at the first plane holding a number: one plane for any real scan.
    The header must have been checked first (`check_nifti_header`)."""
    proxy = img.dataobj
    if np.dtype(proxy.dtype).kind in "biu" and getattr(proxy, "slope", 1.0) == 1.0:
        return  # whole numbers, unscaled: every voxel is one (a float scale could overflow)
    index: list[object] = [slice(None)] * len(img.shape)
    last = 3 if len(img.shape) == 4 else len(img.shape)  # one 4-D volume: its 3rd axis
    axis = last - 1
    for k in range(int(img.shape[axis])):
        index[axis] = k
        try:
            plane = np.asanyarray(proxy[tuple(index)])
        except MemoryError:
            raise InputError(path, "not enough memory to read one NIfTI plane") from None
        except Exception as exc:
            raise InputError(path, f"cannot read NIfTI voxel data ({one_line(exc)})") from None
        if np.isfinite(plane).any():
            return
    raise InputError(path, NO_NUMBER)


def _nifti_type(img: nib.Nifti1Image) -> str:
    code = int(img.header["datatype"])
    try:
        return str(nib.nifti1.data_type_codes.niistring[code]).removeprefix("NIFTI_TYPE_")
    except KeyError:
        return str(img.get_data_dtype())


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(n)) for n in shape)


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
    to_index = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    affine = LPS_TO_RAS @ scan.affine @ to_index
    # A NaN slice position or a zero pixel spacing upstream ends here; say so, not LinAlgError.
    _check_affine(scan.source, affine)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # NIfTI voxel (x, y, z) = our (j, i, k); same world point, converted LPS → RAS.
    data = np.asarray(scan.hu).transpose(2, 1, 0)
    if data.dtype != np.int16:
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)  # scanner anatomical
    img.set_qform(affine, code=1, strip_shears=True)
    img.header["descrip"] = b"ichscan HU"
    nib.save(img, str(out))
    return out
