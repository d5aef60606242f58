"""Pick a centred run of slices: models take a fixed slice count, and the middle of a head
CT holds the brain while the ends hold skull base and vertex."""

from __future__ import annotations

import dataclasses

import numpy as np

from ichscan.scan import Scan

__all__ = ["in_middle", "middle_slices", "select_scan", "select_slices"]


def _first(n_total: np.ndarray, n: int) -> np.ndarray:
    """Where the centred run of ``n`` starts; the extra slice of an odd surplus goes last."""
    return np.maximum(n_total - n, 0) // 2


def _window(n_total: int, n: int | None) -> tuple[int, int]:
    """``(start, stop)`` of the centred run; the extra slice of an odd surplus goes last."""
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    if n is None or n >= n_total:
        return 0, n_total
    _check_n(n)
    start = int(_first(np.asarray(n_total), n))
    return start, start + n


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be a positive slice count or None, got {n}")


def in_middle(position: np.ndarray, n_total: np.ndarray, n: int | None) -> np.ndarray:
    """bool, elementwise: whether slice ``position`` of a scan of ``n_total`` slices is one
    of :func:`middle_slices` ``(n_total, n)`` (for many scans at once, as a manifest holds)."""
    position, n_total = np.asarray(position), np.asarray(n_total)
    if n is None:
        return np.ones(position.shape, dtype=bool)
    _check_n(n)
    start = _first(n_total, n)
    return (position >= start) & (position < start + n)


def middle_slices(n_total: int, n: int | None = 28) -> np.ndarray:
    """Indices of the ``n`` middle slices of ``n_total`` (all of them when n is None or
    ``n >= n_total``), ascending, as an int64 array."""
    start, stop = _window(int(n_total), n)
    return np.arange(start, stop, dtype=np.int64)


def select_slices(volume: np.ndarray, n: int | None = 28) -> np.ndarray:
    """The ``n`` middle slices of ``volume`` (axis 0). A view: it shares memory."""
    start, stop = _window(volume.shape[0], n)
    return volume[start:stop]


def select_scan(scan: Scan, n: int | None = 28) -> Scan:
    """A Scan of the ``n`` middle slices: ids subset, affine origin moved to the new first
    slice, ``metadata["selected_slices"] = (start, stop)`` of the original. Per-slice
    metadata lists from the DICOM reader (``slice_positions_mm``, re-based on the new first
    slice, and ``files``) are subset too. The volume is a view of the original's."""
    start, stop = _window(scan.n_slices, n)
    affine = scan.affine.copy()
    metadata = dict(scan.metadata)
    metadata["selected_slices"] = (start, stop)
    positions = metadata.get("slice_positions_mm")
    if positions is not None and len(positions) == scan.n_slices and stop > start:
        # The DICOM reader's per-slice distances along the normal, from slice 0: keep the
        # selected ones, re-based on the new first slice; move the origin by the actual
        # distance rather than start whole steps, which is wrong across a gap.
        kept = [float(p) for p in positions[start:stop]]
        per_step = float(affine[:3, 0] @ scan.slice_normal)
        if per_step:
            affine[:3, 3] += (kept[0] - float(positions[0])) / per_step * affine[:3, 0]
        else:
            affine[:3, 3] += start * affine[:3, 0]
        metadata["slice_positions_mm"] = [p - kept[0] for p in kept]
    else:
        affine[:3, 3] += start * affine[:3, 0]
    for key in ("files",):  # other per-slice lists the DICOM reader records
        value = metadata.get(key)
        if isinstance(value, list) and len(value) == scan.n_slices:
            metadata[key] = value[start:stop]
    return dataclasses.replace(
        scan,
        hu=scan.hu[start:stop],
        affine=affine,
        slice_ids=list(scan.slice_ids[start:stop]),
        metadata=metadata,
        warnings=list(scan.warnings),
    )
