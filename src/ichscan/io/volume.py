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
from ichscan.io.series import BadFile, Series, build_series
from ichscan.scan import Scan

# Below this many compressed slices a pool costs more than it saves.
MIN_SLICES_FOR_POOL = 24
# A series is refused before its volume is allocated beyond this: 2000 slices of 1024 x 1024
# int16 is 4 GB, while compressed slices of zeros claiming it can fit in a few megabytes.
MAX_VOLUME_BYTES = 4 << 30


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


SliceRef = tuple[int, str, str | None]  # (index in volume, file path, zip member)


def _fill(volume: np.ndarray, refs: list[SliceRef]) -> list[BadFile]:
    """Decode each slice into its place; the slices that cannot be decoded are returned,
    not raised, so that one corrupt slice does not cost the rest of the series."""
    zips: dict[str, zipfile.ZipFile] = {}
    failed: list[BadFile] = []
    try:
        for k, path, member in refs:
            label = f"{path}!{member}" if member else path
            try:
                if member is None:
                    hu, _ = read_slice_hu(path)
                else:
                    zf = zips.get(path) or zips.setdefault(path, zipfile.ZipFile(path))
                    hu, _ = read_slice_hu(zf.read(member), name=label)
            except InputError as exc:
                failed.append(BadFile(label, exc.problem))
                continue
            except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
                failed.append(BadFile(label, f"cannot read ({exc})"))
                continue
            if hu.shape != volume.shape[1:]:
                failed.append(
                    BadFile(
                        label,
                        f"pixel array {hu.shape} does not match the series' {volume.shape[1:]}",
                    )
                )
                continue
            volume[k] = hu
    finally:
        for zf in zips.values():
            zf.close()
    return failed


def _fill_shared(name: str, shape: tuple[int, int, int], refs: list[SliceRef]) -> list[BadFile]:
    shm = SharedMemory(name=name)
    try:
        return _fill(np.ndarray(shape, dtype=np.int16, buffer=shm.buf), refs)
    finally:
        shm.close()


def _decode_parallel(
    shape: tuple[int, int, int], refs: list[SliceRef], workers: int
) -> tuple[np.ndarray, list[BadFile]]:
    nbytes = int(np.prod(shape)) * 2
    shm = SharedMemory(create=True, size=max(nbytes, 1))
    try:
        chunks = [refs[i::workers] for i in range(workers)]
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        failed: list[BadFile] = []
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            for future in [pool.submit(_fill_shared, shm.name, shape, c) for c in chunks]:
                failed += future.result()
        return np.ndarray(shape, dtype=np.int16, buffer=shm.buf).copy(), failed
    finally:
        shm.close()
        shm.unlink()


def decode_volume(
    headers: list[SliceHeader], workers: int | None = None, label: str = ""
) -> tuple[np.ndarray, list[BadFile]]:
    """The series' HU volume, and the slices that could not be decoded (their planes are
    left undefined: the caller drops them)."""
    first = headers[0]
    shape = (len(headers), first.rows, first.cols)
    if int(np.prod(shape)) * 2 > MAX_VOLUME_BYTES:
        raise InputError(
            label or first.path,
            f"{shape[0]} slices of {shape[1]}x{shape[2]} would take "
            f"{np.prod(shape) * 2 / 2**30:.1f} GB, more than the {MAX_VOLUME_BYTES >> 30} GB "
            "a series may take",
        )
    refs = [(k, h.path, h.member) for k, h in enumerate(headers)]
    n_workers = min(workers or default_workers(), len(headers))
    compressed = any(h.transfer_syntax not in NATIVE_SYNTAXES for h in headers)
    if n_workers > 1 and compressed and len(headers) >= MIN_SLICES_FOR_POOL:
        return _decode_parallel(shape, refs, n_workers)
    volume = np.empty(shape, dtype=np.int16)
    return volume, _fill(volume, refs)


def _without_failed(
    series: Series, volume: np.ndarray, failed: list[BadFile], label: str
) -> tuple[Series, np.ndarray]:
    """The series rebuilt from the slices that decoded, and their planes."""
    bad = {f.path for f in failed}
    keep = [
        k
        for k, h in enumerate(series.headers)
        if (f"{h.path}!{h.member}" if h.member else h.path) not in bad
    ]
    if not keep:
        raise InputError(
            label, f"no slice of the series could be read ({len(failed)}; first {failed[0]})"
        )
    rebuilt, _ = build_series(series.series_uid, [series.headers[k] for k in keep])
    if rebuilt is None or [id(h) for h in rebuilt.headers] != [id(series.headers[k]) for k in keep]:
        raise InputError(
            label, f"the series falls apart without its unreadable slices: {failed[0]}"
        )
    rebuilt.selected, rebuilt.selection_reason = series.selected, series.selection_reason
    rebuilt.shares_uid = series.shares_uid
    return rebuilt, volume[keep]


def load_series(series: Series, *, workers: int | None = None, source: str = "") -> Scan:
    """Decode the slices of a series (in its spatial order) into a Scan of int16 HU. A slice
    that cannot be decoded is left out, named in the scan's warnings and in
    ``metadata["unreadable_slices"]`` as ``[path, reason]`` pairs."""
    label = source or series.headers[0].path
    volume, failed = decode_volume(series.headers, workers, label)
    if failed:
        series, volume = _without_failed(series, volume, failed, label)
    headers = series.headers
    first = headers[0]
    warnings = list(series.problems)
    warnings += [f"skipped {f}" for f in failed]
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
            "unreadable_slices": [[f.path, f.reason] for f in failed],
            "series_uid_shared": series.shares_uid,
        },
        warnings=warnings,
    )
