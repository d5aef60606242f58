"""Turn a discovered DICOM series into a Scan: decode every slice into one HU volume.

Compressed slices are decoded in worker processes that write straight into one shared-memory
volume: the JPEG decoders hold the GIL, so threads would not use the second core, and
shared memory avoids pickling ~0.5 MB per slice back to the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from ichscan.errors import InputError
from ichscan.io.dicom import NATIVE_SYNTAXES, SliceHeader, read_slice_hu
from ichscan.io.series import Series
from ichscan.scan import Scan

# Below this many compressed slices a pool costs more than it saves.
MIN_SLICES_FOR_POOL = 24


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


SliceRef = tuple[int, str, str | None]  # (index in volume, file path, zip member)


def _fill(volume: np.ndarray, refs: list[SliceRef]) -> None:
    zips: dict[str, zipfile.ZipFile] = {}
    try:
        for k, path, member in refs:
            if member is None:
                hu, _ = read_slice_hu(path)
            else:
                zf = zips.get(path) or zips.setdefault(path, zipfile.ZipFile(path))
                hu, _ = read_slice_hu(zf.read(member), name=f"{path}!{member}")
            if hu.shape != volume.shape[1:]:
                raise InputError(
                    path, f"pixel array {hu.shape} does not match the series' {volume.shape[1:]}"
                )
            volume[k] = hu
    finally:
        for zf in zips.values():
            zf.close()


def _fill_shared(name: str, shape: tuple[int, int, int], refs: list[SliceRef]) -> None:
    shm = SharedMemory(name=name)
    try:
        _fill(np.ndarray(shape, dtype=np.int16, buffer=shm.buf), refs)
    finally:
        shm.close()


def _decode_parallel(shape: tuple[int, int, int], refs: list[SliceRef], workers: int) -> np.ndarray:
    nbytes = int(np.prod(shape)) * 2
    shm = SharedMemory(create=True, size=max(nbytes, 1))
    try:
        chunks = [refs[i::workers] for i in range(workers)]
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            for future in [pool.submit(_fill_shared, shm.name, shape, c) for c in chunks]:
                future.result()
        return np.ndarray(shape, dtype=np.int16, buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()


def decode_volume(headers: list[SliceHeader], workers: int | None = None) -> np.ndarray:
    first = headers[0]
    shape = (len(headers), first.rows, first.cols)
    refs = [(k, h.path, h.member) for k, h in enumerate(headers)]
    n_workers = min(workers or default_workers(), len(headers))
    compressed = any(h.transfer_syntax not in NATIVE_SYNTAXES for h in headers)
    if n_workers > 1 and compressed and len(headers) >= MIN_SLICES_FOR_POOL:
        return _decode_parallel(shape, refs, n_workers)
    volume = np.empty(shape, dtype=np.int16)
    _fill(volume, refs)
    return volume


def load_series(series: Series, *, workers: int | None = None, source: str = "") -> Scan:
    """Decode the slices of a series (in its spatial order) into a Scan of int16 HU."""
    headers = series.headers
    first = headers[0]
    volume = decode_volume(headers, workers)
    warnings = list(series.problems)
    warnings += sorted({n for h in headers for n in h.notes})
    thickness = series.slice_thickness_mm
    spacing_k = series.slice_spacing_mm or thickness or 1.0
    px = first.pixel_spacing or (1.0, 1.0)
    return Scan(
        hu=volume,
        affine=series.affine.copy(),
        slice_ids=[h.sop_uid or Path(h.member or h.path).stem for h in headers],
        spacing=(float(spacing_k), float(px[0]), float(px[1])),
        patient_id=first.patient_id,
        study_uid=first.study_uid,
        series_uid=series.series_uid,
        source=source or first.path,
        slice_thickness_mm=thickness,
        metadata={
            "format": "dicom",
            "series_description": first.series_description,
            "convolution_kernel": first.convolution_kernel,
            "transfer_syntax": first.transfer_syntax,
            "modality": first.modality,
            "slice_positions_mm": series.positions_mm.tolist(),
            "gantry_tilt_deg": series.gantry_tilt_deg,
            "selection_reason": series.selection_reason,
            "files": [f"{h.path}!{h.member}" if h.member else h.path for h in headers],
        },
        warnings=warnings,
    )
