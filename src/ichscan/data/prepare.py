"""`prepare`: turn every row of a manifest into a windowed, resized uint8 slice, once, in the
shard cache that training streams from (format: :mod:`ichscan.data.cache`).

The work is cut into shard jobs of ``shard_size`` consecutive manifest rows. A job is fully
independent: it gets its rows (a few strings each), decodes them one at a time, streams each
slice straight into its own shard file, and returns only ok flags and reasons. So the parent
never holds pixels, each worker holds one slice at a time, and memory stays flat whatever the
dataset size. The same job runs in a local process pool or as a Ray task.

Per row, by ``kind``:

- ``dicom``: :func:`ichscan.preprocess.slice_input.dicom_to_input` (a zip member is read into
  memory and takes the same decode path).
- ``image``: the PNG/JPEG grey values (already windowed by whoever made the image) resized
  and repeated into every channel: a brain-window PNG cannot give a bone window, and
  cache.json says so.
- ``nifti``: slice ``slice_index`` of the volume, in ichscan's [slice, row, column] order
  (that of :func:`ichscan.io.nifti.read_nifti`), read through nibabel's array proxy (one
  slice, not the whole volume), then windowed with the window lookup table and resized.
- ``series``: slab ``slice_index`` of the DICOM series ``member`` found under ``path``,
  resliced to the manifest's ``slab_mm`` by :func:`ichscan.preprocess.reslice.reslice_scan`
  (what ``predict --reslice`` reads), then windowed and resized. A worker holds one series
  at a time: the slabs of the series it is on, kept while consecutive rows need them.

A shard is redone when its rows, the settings or an input file (its size or modification
time) changed since it was made; otherwise a re-run keeps it. One run at a time may write a
cache folder: a second is refused while the first holds ``.prepare.lock``.

A row that cannot be read is zero-filled, flagged ``ok=False`` and listed with its reason in
report.json; the run goes on. Only a run where no row at all is usable fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ichscan.data.cache import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    FACTS_FILE,
    INDEX_FILE,
    REPORT_FILE,
    SHARDS_DIR,
    ShardWriter,
    marker_path,
    prepare_lock,
    shard_path,
    temp_path,
    write_json_atomic,
)
from ichscan.data.manifest import normalise, read_manifest
from ichscan.errors import InputError, one_line
from ichscan.io.dicom import (
    HU_DECODE_VERSION,
    check_ct_slice,
    decode_stored,
    header_from_dataset,
    read_dataset,
)
from ichscan.io.image import read_grey
from ichscan.io.load import load_discovered
from ichscan.io.nifti import has_a_number, nonfinite_to_air, open_nifti
from ichscan.io.series import Discovery, discover, iter_files
from ichscan.labels import LabelSet, detect_label_set, get_label_set
from ichscan.preprocess.head_crop import CROP_VERSION, CROPS, crop_slice, extra_planes
from ichscan.preprocess.resize import resize_slice
from ichscan.preprocess.reslice import reslice_scan
from ichscan.preprocess.slice_input import dicom_to_input, fused_table, stored_to_input
from ichscan.preprocess.window import (
    DEFAULT_WINDOWS,
    Window,
    WindowSpec,
    apply_lut,
    parse_windows,
    stack_windows,
    window_lut,
)
from ichscan.progress import progress_bar

__all__ = ["PrepareResult", "prepare", "read_row"]

KINDS = ("dicom", "nifti", "image", "series")
MODES = ("linear", "sigmoid")
# A zip member bigger than this is not one CT slice (512² int16 is 0.5 MB); refusing it
# keeps a hostile archive from ballooning a worker.
MAX_MEMBER_BYTES = 64 * 1024**2
# Jobs in flight per worker: enough to keep every worker busy while the parent handles a
# finished one, few enough that pending job descriptions stay small.
IN_FLIGHT_PER_WORKER = 2


class RowRef(NamedTuple):
    """What a worker needs to read one manifest row (all a shard job carries per row)."""

    kind: str
    path: str
    member: str
    image_id: str
    slice_index: int


@dataclass(frozen=True)
class Params:
    windows: tuple[Window, ...]
    size: int
    mode: str
    crop: str = "none"  # preprocess.head_crop: a crop at full resolution first
    slab_mm: float | None = None  # the slab thickness `series` rows are resliced to

    @property
    def channels(self) -> int:
        """The windows per slice."""
        return len(self.windows)

    @property
    def planes(self) -> int:
        """What the cache stores per slice: the windows, and the head plane of a
        ``brain+head`` crop."""
        return self.channels + extra_planes(self.crop)

    def as_json(self) -> dict[str, Any]:
        out = {
            "windows": [w._asdict() for w in self.windows],
            "size": self.size,
            "mode": self.mode,
            "crop": self.crop,
        }
        if self.crop != "none":  # part of the shards' key: a new crop redoes them
            out["crop_version"] = CROP_VERSION
        if self.slab_mm is not None:  # only then: caches without slabs keep their keys
            out["slab_mm"] = self.slab_mm
        out["hu_decode_version"] = HU_DECODE_VERSION  # so is a new decode
        return out


@dataclass(frozen=True)
class ShardJob:
    shard: int
    root: str
    rows: tuple[RowRef, ...]
    params: Params
    key: str  # hash of the rows and the params: what a done marker must match


@dataclass
class ShardOutcome:
    shard: int
    ok: list[bool]
    bad: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False


@dataclass(frozen=True)
class PrepareResult:
    n_ok: int
    n_bad: int
    n_shards: int
    n_skipped_shards: int
    seconds: float
    report: Path
    out: Path


# ---------------------------------------------------------------------------------------
# Reading one row


class _Nifti:
    """An open NIfTI volume that yields single slices in ichscan's [slice, row, col] order
    without loading the volume: the orientation that read_nifti applies to the whole array
    (RAS-canonical, then [z, y, x] with rows and columns flipped) is applied to the index
    instead, so only one plane is read through the array proxy."""

    def __init__(self, path: str) -> None:
        # read_nifti's header checks (one 3-D volume, size, voxel type, affine) and its
        # refusal of a volume with no number; nothing is read but one plane, or until a
        # plane holds a number. keep_file_open: a .nii.gz stream stays open, so reading
        # consecutive slices is a forward seek instead of a decompression from the start.
        self.img = open_nifti(path, keep_file_open=True)
        has_a_number(self.img, path)
        self.path = path
        shape = self.img.shape
        ornt = nib.orientations.io_orientation(self.img.affine)
        if np.isnan(ornt).any() or sorted(ornt[:, 0]) != [0, 1, 2]:
            raise InputError(path, "NIfTI affine has no clear axis orientation")
        self.ndim = len(shape)
        self.shape = tuple(int(s) for s in shape[:3])
        # For canonical axis j (x, y, z): the file's axis holding it, and whether it runs
        # backwards.
        self.axis = [int(np.flatnonzero(ornt[:, 0] == j)[0]) for j in range(3)]
        self.flip = [bool(ornt[self.axis[j], 1] < 0) for j in range(3)]

    @property
    def n_slices(self) -> int:
        return self.shape[self.axis[2]]

    def slice(self, k: int) -> np.ndarray:
        """Slice k as read_nifti(path).hu[k] would give it (int16 or float32)."""
        n = self.n_slices
        if not 0 <= k < n:
            raise InputError(self.path, f"slice {k} is outside the volume's {n} slices")
        z = self.axis[2]
        index: list[Any] = [slice(None)] * self.ndim
        index[z] = n - 1 - k if self.flip[2] else k
        if self.ndim == 4:
            index[3] = 0
        try:
            plane = np.asanyarray(self.img.dataobj[tuple(index)])
        except MemoryError:
            raise InputError(self.path, "not enough memory to read one NIfTI slice") from None
        except Exception as exc:
            raise InputError(self.path, f"cannot read NIfTI voxel data ({one_line(exc)})") from None
        # plane keeps the file's two other axes in file order; bring it to canonical [x, y].
        rest = [a for a in range(3) if a != z]
        if self.axis[0] != rest[0]:
            plane = plane.T
        if self.flip[0]:
            plane = plane[::-1, :]
        if self.flip[1]:
            plane = plane[:, ::-1]
        # canonical [x, y] → [row, col] = [ny-1-y, nx-1-x], as read_nifti does.
        return _as_hu(np.ascontiguousarray(plane.T[::-1, ::-1]), self.path)


def _as_hu(plane: np.ndarray, path: str) -> np.ndarray:
    """int16 when the values are whole numbers in range (read_nifti's rule, per slice);
    NaN or infinite voxels are air, as read_nifti reads them."""
    if np.issubdtype(plane.dtype, np.floating):
        plane, _ = nonfinite_to_air(plane)
        rounded = np.rint(plane)
        if np.allclose(plane, rounded) and (
            plane.size == 0 or (rounded.min() >= -32768 and rounded.max() <= 32767)
        ):
            return rounded.astype(np.int16)
        return plane.astype(np.float32)
    if plane.dtype.kind not in "biu":  # the header check refuses these; never cast them
        raise InputError(path, f"voxel type {plane.dtype} is not a greyscale intensity")
    if plane.dtype != np.int16:
        if plane.size and (plane.min() < -32768 or plane.max() > 32767):
            raise InputError(path, f"voxel values {plane.min()}..{plane.max()} are not HU")
        return plane.astype(np.int16)
    return plane


class RowReader:
    """Reads rows in order, keeping the last zip archive and NIfTI volume open: consecutive
    rows of one scan (the manifest order) then share one open."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self._zip: tuple[str, zipfile.ZipFile] | None = None
        self._nifti: _Nifti | None = None
        # The last volume that could not be opened: its other rows fail the same way
        # without opening it again (an all-NaN volume is read whole to be refused).
        self._nifti_error: tuple[str, str] | None = None
        # The slabs of the last series read (or why it could not be), keyed by where it
        # lies and its UID: one series volume per worker at a time.
        self._slabs: tuple[tuple[str, str], np.ndarray | str] | None = None
        # The last source's series headers: its next series is found without reading every
        # header under it again (a flat DICOM folder is the source of all its series).
        self._found: tuple[str, Discovery] | None = None

    def read(self, row: RowRef) -> np.ndarray:
        if row.kind == "dicom":
            return self._dicom(row)
        if row.kind == "image":
            return self._image(row)
        if row.kind == "nifti":
            return self._nifti_slice(row)
        if row.kind == "series":
            return self._slab(row)
        raise InputError(row.path, f"unknown row kind {row.kind!r}; expected one of {KINDS}")

    def _dicom(self, row: RowRef) -> np.ndarray:
        p = self.params
        if not row.member:
            if p.crop != "none":
                return _crop_resize(dicom_to_input(row.path, p.windows, None, p.mode), p)
            return dicom_to_input(row.path, p.windows, p.size, p.mode)
        label = f"{row.path}!{row.member}"
        ds = read_dataset(io.BytesIO(self._member_bytes(row)), name=label)
        # The same steps as dicom_to_input, from bytes instead of a path.
        header = header_from_dataset(ds, row.path, row.member)
        check_ct_slice(header, label)
        stored = decode_stored(ds, header, label)
        table = fused_table(header.encoding, p.windows, p.mode)
        if p.crop != "none":
            return _crop_resize(stored_to_input(stored, table, p.channels, None), p)
        return stored_to_input(stored, table, p.channels, p.size)

    def _member_bytes(self, row: RowRef) -> bytes:
        if self._zip is None or self._zip[0] != row.path:
            self.close()
            try:
                self._zip = (row.path, zipfile.ZipFile(row.path))
            except FileNotFoundError:
                raise InputError(row.path, "file not found") from None
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(row.path, f"not a readable zip archive ({exc})") from None
        zf = self._zip[1]
        try:
            info = zf.getinfo(row.member)
        except KeyError:
            raise InputError(row.path, f"zip has no member {row.member!r}") from None
        if info.file_size > MAX_MEMBER_BYTES:
            raise InputError(
                row.path, f"zip member {row.member!r} is {info.file_size} bytes, not one slice"
            )
        try:
            return zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise InputError(row.path, f"cannot read zip member {row.member!r} ({exc})") from None

    def _image(self, row: RowRef) -> np.ndarray:
        grey = read_grey(row.path)
        p = self.params
        if p.crop != "none":
            small = _crop_resize(grey[..., np.newaxis], p)  # a brain+head crop adds a plane
        else:
            small = resize_slice(grey, p.size)[..., np.newaxis]
        # Display values in one window: the same grey in every channel (see cache.json).
        windows = np.repeat(small[..., :1], p.channels, axis=2)
        return np.concatenate([windows, small[..., 1:]], axis=2) if small.shape[2] > 1 else windows

    def _nifti_slice(self, row: RowRef) -> np.ndarray:
        if self._nifti is None or self._nifti.path != row.path:
            self._nifti = None  # drop the old proxy before opening the next volume
            if self._nifti_error is not None and self._nifti_error[0] == row.path:
                raise InputError(row.path, self._nifti_error[1])
            try:
                self._nifti = _Nifti(row.path)
            except InputError as exc:
                self._nifti_error = (row.path, exc.problem)
                raise
            except Exception as exc:  # whatever nibabel raises on one file
                problem = f"cannot read the NIfTI file ({one_line(exc)})"
                self._nifti_error = (row.path, problem)
                raise InputError(row.path, problem) from None
        hu = self._nifti.slice(int(row.slice_index))
        p = self.params
        if hu.dtype == np.int16:
            windowed = apply_lut(hu, window_lut(list(p.windows), mode=p.mode))
        else:
            windowed = stack_windows(hu, list(p.windows), mode=p.mode)
        if p.crop != "none":
            return _crop_resize(windowed, p)
        return resize_slice(windowed, p.size)

    def _slab(self, row: RowRef) -> np.ndarray:
        key = (row.path, row.member)
        if self._slabs is None or self._slabs[0] != key:
            self._slabs = None  # let the last series go before reading the next
            try:
                if self._found is None or self._found[0] != row.path:
                    self._found = None
                    self._found = (row.path, discover(row.path))
                found = self._found[1]
                self._slabs = (key, read_slabs(found, row.member, self.params.slab_mm))
            except InputError as exc:
                self._slabs = (key, exc.problem)  # its other rows fail alike, unread
        slabs = self._slabs[1]
        if isinstance(slabs, str):
            raise InputError(row.path, slabs)
        k = int(row.slice_index)
        if not 0 <= k < len(slabs):
            raise InputError(
                row.path, f"series {row.member}: slab {k} is outside its {len(slabs)} slabs"
            )
        p = self.params
        windowed = apply_lut(slabs[k], window_lut(list(p.windows), mode=p.mode))
        if p.crop != "none":
            return _crop_resize(windowed, p)
        return resize_slice(windowed, p.size)

    def close(self) -> None:
        if self._zip is not None:
            self._zip[1].close()
            self._zip = None
        self._nifti = None
        self._nifti_error = None
        self._slabs = None
        self._found = None


def read_slabs(source: str | Discovery, series_uid: str, slab_mm: float | None) -> np.ndarray:
    """int16 HU slabs [n, rows, cols] of the series `series_uid` under `source` (folder or
    zip), resliced to `slab_mm` along the slice normal, tilt corrected: exactly the slabs
    `predict --reslice` reads; `source` may be its discovery already made. Decoded in this
    process (a prepare worker has its own)."""
    found = source if isinstance(source, Discovery) else discover(source)
    if slab_mm is None:
        raise InputError(found.source, "a series row needs a slab thickness (slab_mm) to be read")
    scan = load_discovered(found, series_uid=series_uid, workers=1)
    try:
        return reslice_scan(scan, slab_mm).hu
    except ValueError as exc:
        raise InputError(found.source, f"cannot reslice series {series_uid} ({exc})") from None


def _crop_resize(planes: np.ndarray, p: Params) -> np.ndarray:
    """Full-resolution windowed planes [H, W, C] → head crop → [size, size, C]. The same two
    steps as infer.inputs for a bundle that names a crop."""
    return resize_slice(crop_slice(planes, p.crop), p.size)


def read_row(
    row: RowRef | pd.Series | dict[str, Any],
    windows: WindowSpec = DEFAULT_WINDOWS,
    size: int = 256,
    mode: str = "linear",
    crop: str = "none",
    slab_mm: float | None = None,
) -> np.ndarray:
    """One manifest row → uint8 [size, size, C], exactly as `prepare` stores it (`slab_mm`:
    the manifest's slab thickness, for a `series` row)."""
    params = _params(windows, size, mode, crop, slab_mm)
    reader = RowReader(params)
    try:
        return reader.read(_row_ref(row))
    finally:
        reader.close()


def _row_ref(row: RowRef | pd.Series | dict[str, Any]) -> RowRef:
    if isinstance(row, RowRef):
        return row
    return RowRef(
        str(row["kind"]),
        str(row["path"]),
        str(row.get("member", "") or ""),
        str(row.get("image_id", "")),
        int(row.get("slice_index", 0)),
    )


# ---------------------------------------------------------------------------------------
# One shard job (runs in a worker process or a Ray task)


def run_shard(job: ShardJob) -> ShardOutcome:
    """Decode the job's rows into its shard file; return ok flags and bad-row reasons."""
    start = time.perf_counter()
    p = job.params
    # No marker while the shard is being (re)made: only a finished shard has one.
    marker_path(job.root, job.shard).unlink(missing_ok=True)
    writer = ShardWriter(shard_path(job.root, job.shard), len(job.rows), p.size, p.planes)
    reader = RowReader(p)
    blank = np.zeros((p.size, p.size, p.planes), dtype=np.uint8)
    outcome = ShardOutcome(job.shard, ok=[])
    try:
        for row in job.rows:
            try:
                arr = reader.read(row)
                if arr.shape != blank.shape or arr.dtype != np.uint8:
                    raise ValueError(f"reader gave {arr.dtype} {arr.shape}, not {blank.shape}")
                outcome.ok.append(True)
            except Exception as exc:
                # One unreadable file must not stop a 750k-slice run: it is zero-filled,
                # flagged and reported. (A bug that breaks every row still surfaces: a run
                # with no usable row fails, naming the first reason.)
                arr = blank
                outcome.ok.append(False)
                outcome.bad.append(_bad_entry(row, exc))
            writer.write(arr)  # a write error (disk full) is not the row's fault: it stops
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()
    outcome.seconds = time.perf_counter() - start
    marker = {
        "shard": job.shard,
        "key": job.key,
        "rows": len(job.rows),
        "first_id": job.rows[0].image_id,
        "last_id": job.rows[-1].image_id,
        "ok": outcome.ok,
        "bad": outcome.bad,
        "seconds": round(outcome.seconds, 3),
    }
    write_json_atomic(marker_path(job.root, job.shard), marker)
    return outcome


def _bad_entry(row: RowRef, exc: BaseException) -> dict[str, str]:
    reason = exc.problem if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    return {
        "path": row.path,
        "member": row.member,
        "image_id": row.image_id,
        "kind": row.kind,
        "reason": reason,
    }


def finished_outcome(job: ShardJob) -> ShardOutcome | None:
    """The recorded outcome when this shard is already done for exactly these rows and
    settings; None when it has to be (re)made."""
    path, marker = shard_path(job.root, job.shard), marker_path(job.root, job.shard)
    if not (path.is_file() and marker.is_file()):
        return None
    try:
        done = json.loads(marker.read_text())
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    p = job.params
    if done.get("key") != job.key or shape != (len(job.rows), p.size, p.size, p.planes):
        return None
    return ShardOutcome(job.shard, ok=list(done["ok"]), bad=list(done["bad"]), skipped=True)


# ---------------------------------------------------------------------------------------
# Executors: the same jobs on a local process pool or on Ray


Runner = Callable[[Iterator[ShardJob]], Iterator[ShardOutcome]]


def _run_inline(jobs: Iterator[ShardJob]) -> Iterator[ShardOutcome]:
    for job in jobs:
        yield run_shard(job)


def _pool_context() -> mp.context.BaseContext:
    """fork where there is one: workers start in milliseconds with ichscan imported, and a
    script that calls prepare() at top level (no ``if __name__ == "__main__"`` guard) still
    works, which spawn and forkserver would break by re-running it in every worker. What a
    worker inherits (the manifest) is shared copy-on-write and never written: it shows in
    each worker's RSS but is one copy in RAM (see benchmarks/prepare_memory.py, PSS)."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


def _pool_runner(workers: int) -> Runner:
    def run(jobs: Iterator[ShardJob]) -> Iterator[ShardOutcome]:
        with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
            pending: set[Future[ShardOutcome]] = set()
            limit = workers * IN_FLIGHT_PER_WORKER
            try:
                for job in jobs:
                    if len(pending) >= limit:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        yield from (f.result() for f in done)
                    pending.add(pool.submit(run_shard, job))
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            except BaseException:
                # A failed job (disk full...) or Ctrl-C: do not start the queued ones.
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    return run


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(
            None, "--ray needs Ray, which is not installed: pip install ray (or 'ray[default]')"
        ) from None
    return ray


def _ray_runner(address: str, workers: int) -> Runner:
    ray = _import_ray()

    def run(jobs: Iterator[ShardJob]) -> Iterator[ShardOutcome]:
        started = False
        if not ray.is_initialized():
            if address == "local":
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    # Jobs pass a few strings each way; the default object store (30% of
                    # RAM) would only reserve shared memory nobody uses.
                    object_store_memory=128 * 1024**2,
                )
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            started = True
        try:
            task = ray.remote(num_cpus=1)(run_shard)
            limit = max(1, int(ray.cluster_resources().get("CPU", workers))) * (
                IN_FLIGHT_PER_WORKER
            )
            pending: list[Any] = []
            for job in jobs:
                if len(pending) >= limit:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield from ray.get(done)
                pending.append(task.remote(job))
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield from ray.get(done)
        finally:
            if started:
                ray.shutdown()

    return run


def _runner(workers: int, ray_address: str | None) -> Runner:
    if ray_address:
        return _ray_runner(ray_address, workers)
    if workers <= 1:
        return _run_inline
    return _pool_runner(workers)


# ---------------------------------------------------------------------------------------
# The prepare verb


class _RunOptions(NamedTuple):
    """How a prepare runs, as opposed to what it makes (Params)."""

    workers: int | None
    ray: str | None
    progress: bool
    overwrite: bool


def _params(
    windows: WindowSpec, size: int, mode: str, crop: str = "none", slab_mm: float | None = None
) -> Params:
    wins = tuple(parse_windows(windows))
    if len(wins) > 3:
        raise ValueError(f"at most 3 windows (channels) per slice, got {len(wins)}")
    if mode not in MODES:
        raise ValueError(f"window mode must be one of {MODES}, got {mode!r}")
    if int(size) < 1:
        raise ValueError(f"size must be positive, got {size}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if crop != "none" and wins[0].name != "brain":
        raise ValueError(f"a {crop} crop finds the head in a brain window: list brain first")
    if len(wins) + extra_planes(crop) > 3:
        raise ValueError(f"a {crop} crop adds a plane: at most 2 windows with it")
    if slab_mm is not None and not float(slab_mm) > 0:
        raise ValueError(f"slab_mm must be a positive thickness, got {slab_mm}")
    return Params(wins, int(size), mode, crop, None if slab_mm is None else float(slab_mm))


def _load_manifest(
    manifest_or_df: str | Path | pd.DataFrame, label_set: str | LabelSet | None
) -> tuple[pd.DataFrame, LabelSet, dict[str, Any]]:
    if isinstance(manifest_or_df, pd.DataFrame):
        facts: dict[str, Any] = {}
        if label_set is None:
            labels = detect_label_set(list(manifest_or_df.columns))
        else:
            labels = get_label_set(label_set) if isinstance(label_set, str) else label_set
        df = normalise(manifest_or_df, labels).reset_index(drop=True)
    else:
        # A manifest file was normalised when written and read_manifest checks its columns.
        # Normalising again would turn its compact Arrow string columns into Python objects:
        # ~5x the memory (about +0.6 KB per row, +450 MB on the full RSNA set).
        df, facts = read_manifest(manifest_or_df)
        facts = {**facts, "source": str(manifest_or_df)}
        labels = get_label_set(facts["label_set"])
    if df.empty:
        raise InputError(facts.get("source"), "manifest has no rows: nothing to prepare")
    unknown = sorted(set(df["kind"]) - set(KINDS))
    if unknown:
        raise InputError(facts.get("source"), f"unknown row kind(s) {unknown}; expected {KINDS}")
    return df, labels, facts


def _shard_key(rows: Sequence[RowRef], params: Params, stamps: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps(params.as_json(), sort_keys=True).encode())
    for row, stamp in zip(rows, stamps, strict=True):
        digest.update("\x1f".join(map(str, row)).encode())
        digest.update(b"\x1f" + stamp.encode() + b"\x1e")
    return digest.hexdigest()


class _Stamps:
    """Size and modification time of each row's file, so that a file replaced in place
    (a corrected re-export under the same name and ids) gets its shard redone. Rows of one
    file come together (a volume's slices, a zip's members), so the last stat is reused; a
    `series` row's folder stands for all the files in it, walked once per run (a flat
    DICOM folder's slab rows and slice rows alternate)."""

    def __init__(self) -> None:
        self._last: tuple[str, str] = ("", "")
        self._folders: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if self._last[0] != path:
            if path in self._folders:
                stamp = self._folders[path]
            else:
                stamp = _stamp(path)
                if os.path.isdir(path):
                    self._folders[path] = stamp
            self._last = (path, stamp)
        return self._last[1]


def _stamp(path: str) -> str:
    try:
        if not os.path.isdir(path):
            st = os.stat(path)
            return f"{st.st_size}:{st.st_mtime_ns}"
        digest = hashlib.sha256()
        for file in iter_files(Path(path)):
            st = file.stat()
            digest.update(f"{file}\x1f{st.st_size}:{st.st_mtime_ns}\x1e".encode())
        return digest.hexdigest()
    except OSError:
        return "unreadable"  # the worker says why; the key stays stable meanwhile


def _jobs(df: pd.DataFrame, root: Path, params: Params, shard_size: int) -> Iterator[ShardJob]:
    """Shard jobs in manifest order, built lazily so a huge manifest is never duplicated."""
    stamp = _Stamps()
    for shard, start in enumerate(range(0, len(df), shard_size)):
        # Python strings for one shard at a time: converting whole columns up front would
        # hold a second copy of the manifest as Python objects.
        chunk = df.iloc[start : start + shard_size]
        columns = [chunk[c].tolist() for c in RowRef._fields]
        # Absolute paths: a Ray worker does not run in this process's working directory.
        rows = tuple(
            RowRef(str(k), os.path.abspath(p), str(m), str(i), int(s))
            for k, p, m, i, s in zip(*columns, strict=True)
        )
        key = _shard_key(rows, params, [stamp(row.path) for row in rows])
        yield ShardJob(shard, str(root), rows, params, key)


def _clean(root: Path, n_shards: int, overwrite: bool) -> None:
    """Invalidate the finished-cache files (a run in progress is not a cache), remove what a
    killed run left half-written, and shards past the end of this manifest."""
    for name in (FACTS_FILE, INDEX_FILE, REPORT_FILE):
        (root / name).unlink(missing_ok=True)
    shards = root / SHARDS_DIR
    for path in shards.glob(".shard-*.tmp"):
        path.unlink()
    for path in [*shards.glob("shard-*.npy"), *shards.glob("shard-*.json")]:
        number = path.stem.removeprefix("shard-")
        if overwrite or not number.isdigit() or int(number) >= n_shards:
            path.unlink()


def prepare(
    manifest_or_df: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    windows: WindowSpec = DEFAULT_WINDOWS,
    size: int = 256,
    mode: str = "linear",
    workers: int | None = None,
    shard_size: int = 1024,
    ray: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    label_set: str | LabelSet | None = None,
    facts: dict[str, Any] | None = None,
    crop: str = "none",
) -> PrepareResult:
    """Preprocess every manifest row into the shard cache at `out` (see module notes).

    Resumable: shards already made for the same rows and settings are skipped; `overwrite`
    remakes everything. `ray` = "local" or a cluster address runs the shard jobs as Ray
    tasks (every node must see the input files and `out` at the same paths). `label_set`
    names the label set of a DataFrame (detected from its columns when omitted); `facts`
    (layout, label_level, source...: an AdapterReport's ``facts()``) describe a DataFrame the
    way a manifest file's metadata does, and land in cache.json under "manifest"; their
    `slab_mm` is the thickness `series` rows are resliced to. A second prepare into the
    same `out` while this one runs is refused (InputError naming the lock).
    Raises InputError when no row at all could be read; otherwise bad rows are zero-filled
    and listed in report.json.
    """
    start = time.perf_counter()
    run = _RunOptions(workers, ray, progress, overwrite)
    params = _params(windows, size, mode, crop)
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    df, labels, manifest_facts = _load_manifest(manifest_or_df, label_set)
    manifest_facts = {**manifest_facts, **(facts or {})}
    params = _with_slabs(params, df, manifest_facts)
    root = Path(out).absolute()
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder; choose a folder for the cache")
    (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    with prepare_lock(root):
        return _prepare_shards(df, root, labels, manifest_facts, params, shard_size, start, run)


def _with_slabs(params: Params, df: pd.DataFrame, facts: dict[str, Any]) -> Params:
    """The params with the manifest's slab thickness, which its `series` rows need."""
    slab_mm = facts.get("slab_mm")
    if slab_mm is None and (df["kind"] == "series").any():
        raise InputError(
            facts.get("source"),
            "the manifest has series rows (slabs) but no slab thickness: pass the adapter's "
            "facts (AdapterReport.facts(), with slab_mm) along with it",
        )
    if slab_mm is None:
        return params
    if not float(slab_mm) > 0:
        raise InputError(facts.get("source"), f"slab thickness {slab_mm!r} is not above 0 mm")
    return replace(params, slab_mm=float(slab_mm))


def _prepare_shards(
    df: pd.DataFrame,
    root: Path,
    labels: LabelSet,
    manifest_facts: dict[str, Any],
    params: Params,
    shard_size: int,
    start: float,
    run: _RunOptions,
) -> PrepareResult:
    n_shards = -(-len(df) // shard_size)
    _clean(root, n_shards, run.overwrite)
    workers = max(1, run.workers or len(os.sched_getaffinity(0)))
    if not run.ray:
        workers = min(workers, n_shards)  # one shard is one job: more processes would idle

    outcomes: dict[int, ShardOutcome] = {}
    bar = progress_bar(total=len(df), unit="slice", desc="prepare", disable=not run.progress)

    def todo() -> Iterator[ShardJob]:
        for job in _jobs(df, root, params, shard_size):
            done = finished_outcome(job)
            if done is None:
                yield job
            else:
                outcomes[job.shard] = done
                bar.update(len(job.rows))

    with bar:
        for outcome in _runner(workers, run.ray)(todo()):
            outcomes[outcome.shard] = outcome
            bar.update(len(outcome.ok))
    seconds = time.perf_counter() - start
    return _finish(root, df, labels, manifest_facts, params, shard_size, outcomes, seconds)


def _finish(
    root: Path,
    df: pd.DataFrame,
    labels: LabelSet,
    manifest_facts: dict[str, Any],
    params: Params,
    shard_size: int,
    outcomes: dict[int, ShardOutcome],
    seconds: float,
) -> PrepareResult:
    ordered = [outcomes[s] for s in sorted(outcomes)]
    ok = np.fromiter((flag for o in ordered for flag in o.ok), dtype=bool, count=len(df))
    bad = [entry for o in ordered for entry in o.bad]
    n_ok, n_skipped = int(ok.sum()), sum(o.skipped for o in ordered)
    counts = {
        "rows": len(df),
        "ok": n_ok,
        "bad": len(bad),
        "shards": len(ordered),
        "skipped_shards": n_skipped,
        "by_kind": {str(k): int(v) for k, v in df["kind"].value_counts().items()},
    }
    report = root / REPORT_FILE
    write_json_atomic(report, {"counts": counts, "bad": bad})
    if n_ok == 0:
        first = bad[0]
        raise InputError(
            first["path"],
            f"no usable slice: all {len(df)} rows failed (first: {first['reason']}); see {report}",
        )
    position = np.arange(len(df))
    index = pa.Table.from_pandas(df, preserve_index=False)
    index = index.append_column("shard", pa.array((position // shard_size).astype(np.int32)))
    index = index.append_column("offset", pa.array((position % shard_size).astype(np.int32)))
    index = index.append_column("ok", pa.array(ok))
    index_path = root / INDEX_FILE
    tmp = temp_path(index_path)
    pq.write_table(index, tmp)
    tmp.replace(index_path)
    facts = _cache_facts(df, labels, manifest_facts, params, shard_size, counts, seconds)
    write_json_atomic(root / FACTS_FILE, facts)  # last: its presence marks a complete cache
    return PrepareResult(n_ok, len(bad), len(ordered), n_skipped, seconds, report, root)


def _input_note(df: pd.DataFrame, params: Params) -> str:
    images = df["kind"] == "image"
    if not images.any() or params.channels == 1:
        return ""
    in_windows = ", ".join(sorted({w or "unknown" for w in df.loc[images, "window"]}))
    names = ", ".join(w.name for w in params.windows)
    return (
        f"{int(images.sum())} image row(s) hold display values already windowed "
        f"({in_windows}); their grey value is repeated in all {params.channels} channels, so "
        f"for them the channels are not the {names} windows (a brain-window PNG cannot give "
        "a bone window)"
    )


def _cache_facts(
    df: pd.DataFrame,
    labels: LabelSet,
    manifest_facts: dict[str, Any],
    params: Params,
    shard_size: int,
    counts: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    from ichscan import __version__

    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        **params.as_json(),
        "channels": params.planes,
        "dtype": "uint8",
        "layout": {
            "shards": f"{SHARDS_DIR}/shard-{{shard:05d}}.npy",
            "axes": "[slice, row, col, channel]",
            "shard_size": shard_size,
            "index": INDEX_FILE,
            "order": "manifest order; index row i is shard i // shard_size, offset i % shard_size",
        },
        "resize": (
            "squashed to size x size (aspect not kept): DICOM as dicom_to_input (box average "
            "for integer factors, else bilinear), images and NIfTI with resize_slice"
        ),
        "input_note": _input_note(df, params),
        "label_set": labels.name,
        "labels": list(labels.labels),
        "manifest": {k: v for k, v in manifest_facts.items() if k != "labels"},
        "counts": counts,
        "seconds": round(seconds, 2),
        "ichscan_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def result_dict(result: PrepareResult) -> dict[str, Any]:
    """The result as JSON-ready data (for the CLI's --json)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
