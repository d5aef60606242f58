"""Turn a discovered DICOM series into a Scan: decode every slice into one HU volume."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ichscan.errors import InputError
from ichscan.io.dicom import SliceHeader, read_slice_hu
from ichscan.io.series import Series
from ichscan.scan import Scan

# Decoders (libjpeg, openjpeg, charls, numpy) release the GIL for the heavy part, so threads
# use both cores without the pickling cost of processes.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _slice_reader(series: Series) -> Callable[[SliceHeader], np.ndarray]:
    zips: dict[str, zipfile.ZipFile] = {}

    def read(h: SliceHeader) -> np.ndarray:
        if h.member is None:
            hu, _ = read_slice_hu(h.path)
        else:
            zf = zips.get(h.path) or zips.setdefault(h.path, zipfile.ZipFile(h.path))
            hu, _ = read_slice_hu(zf.read(h.member), name=f"{h.path}!{h.member}")
        return hu

    read.zips = zips  # type: ignore[attr-defined]
    return read


def load_series(series: Series, *, workers: int | None = None, source: str = "") -> Scan:
    """Decode the slices of a series (in its spatial order) into a Scan of int16 HU."""
    headers = series.headers
    first = headers[0]
    volume = np.empty((len(headers), first.rows, first.cols), dtype=np.int16)
    read = _slice_reader(series)
    n_workers = max(1, workers or DEFAULT_WORKERS)

    def fill(k: int) -> None:
        hu = read(headers[k])
        if hu.shape != volume.shape[1:]:
            raise InputError(
                headers[k].path,
                f"pixel array {hu.shape} does not match the series' {volume.shape[1:]}",
            )
        volume[k] = hu

    try:
        if n_workers == 1 or len(headers) < 8:
            for k in range(len(headers)):
                fill(k)
        else:
            with ThreadPoolExecutor(n_workers) as pool:
                list(pool.map(fill, range(len(headers))))
    finally:
        for zf in read.zips.values():  # type: ignore[attr-defined]
            zf.close()

    warnings = list(series.problems)
    for note in sorted({n for h in headers for n in h.notes}):
        warnings.append(note)
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
