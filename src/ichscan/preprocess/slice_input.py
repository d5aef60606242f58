"""The training/inference hot path: one DICOM slice → a windowed, resized uint8 model input.

Stored value → HU → window channels is a pure function of the stored value, so it is folded
into one lookup table per (pixel encoding, windows) and applied with a single 4-byte gather;
the 4-byte rows are exactly PIL's RGBX layout, so the resize runs in PIL's C code on all
channels at once. No float copy of the slice is ever made.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import islice
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
from PIL import Image

from ichscan.errors import InputError
from ichscan.io.dicom import (
    PixelEncoding,
    check_ct_slice,
    decode_stored,
    header_from_dataset,
    hu_lookup_table,
    read_dataset,
)
from ichscan.preprocess.window import DEFAULT_WINDOWS, Window, parse_windows, window_lut


@lru_cache(maxsize=64)
def fused_table(encoding: PixelEncoding, windows: tuple[Window, ...], mode: str) -> np.ndarray:
    """uint32 [2**bits] : stored value → up to 3 window channels packed little-endian."""
    if len(windows) > 3:
        raise ValueError(f"at most 3 windows in one model input, got {len(windows)}")
    hu = hu_lookup_table(encoding)
    channels = window_lut(list(windows), mode=mode)[hu.view(np.uint16)]
    packed = np.zeros((hu.size, 4), dtype=np.uint8)
    packed[:, : len(windows)] = channels
    table = packed.view("<u4").reshape(hu.size)
    table.setflags(write=False)
    return table


def stored_to_input(
    stored: np.ndarray, table: np.ndarray, channels: int, size: int | None
) -> np.ndarray:
    """Gather through the fused table and resize: uint8 [size, size, channels]."""
    index = stored.view(np.uint16) if stored.dtype.itemsize == 2 else stored.astype(np.uint16)
    rgbx = np.take(table, index, mode="wrap")
    rows, cols = stored.shape
    img = Image.frombuffer("RGBX", (cols, rows), rgbx, "raw", "RGBX", 0, 1)
    if size is not None and (rows, cols) != (size, size):
        if rows == cols and rows % size == 0:
            # An exact integer factor (512→256) is a box average: antialiased and ~6x
            # cheaper than PIL's general resampling.
            img = img.reduce(rows // size)
        else:
            img = img.resize((size, size), Image.BILINEAR)
    if channels == 1:
        return np.asarray(img.getchannel(0))[..., np.newaxis]
    # convert() drops the pad byte in C; slicing the numpy view would copy byte-strided.
    rgb = np.asarray(img.convert("RGB"))
    return rgb if channels == 3 else np.ascontiguousarray(rgb[..., :channels])


def _is_parsed(windows: object) -> bool:
    return isinstance(windows, tuple) and all(isinstance(w, Window) for w in windows)


def dicom_to_input(
    source: str | Path,
    windows: Sequence[str | Window] | str = DEFAULT_WINDOWS,
    size: int | None = 256,
    mode: str = "linear",
) -> np.ndarray:
    """One DICOM CT slice → uint8 [size, size, len(windows)] (windows as channels)."""
    wins = windows if _is_parsed(windows) else tuple(parse_windows(windows))
    label = str(source)
    ds = read_dataset(source, name=label)
    header = header_from_dataset(ds, label, geometry=False)
    check_ct_slice(header, label)
    stored = decode_stored(ds, header, label)
    return stored_to_input(stored, fused_table(header.encoding, wins, mode), len(wins), size)


def _worker(
    args: tuple[str, tuple[Window, ...], int | None, str],
) -> tuple[str, np.ndarray | InputError]:
    path, windows, size, mode = args
    try:
        return path, dicom_to_input(path, windows, size, mode)
    except InputError as exc:
        return path, exc


def _fill_slots(
    args: tuple[str, tuple[int, ...], list[tuple[int, str]], tuple[Window, ...], int, str],
) -> list[tuple[int, InputError]]:
    """Worker: write each slice's input into its slot of the shared batch; return the errors."""
    shm_name, shape, items, windows, size, mode = args
    shm = SharedMemory(name=shm_name)
    try:
        out = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
        errors = []
        for slot, path in items:
            try:
                out[slot] = dicom_to_input(path, windows, size, mode)
            except InputError as exc:
                errors.append((slot, exc))
        return errors
    finally:
        shm.close()


def dicom_files_to_inputs(
    paths: Iterable[str | Path],
    windows: Sequence[str | Window] | str = DEFAULT_WINDOWS,
    size: int | None = 256,
    mode: str = "linear",
    workers: int | None = None,
    chunksize: int = 16,
) -> Iterator[tuple[str, np.ndarray | InputError]]:
    """Stream (path, input or the error) in input order, over `workers` processes.

    A bad file yields its InputError instead of stopping the stream: the caller lists it and
    goes on. Workers write into shared-memory batches (pickling ~200 KB per slice back
    through a pipe cost as much as a third core), double-buffered so they never wait for the
    consumer; paths are taken a batch at a time, so memory stays flat however many files
    there are.
    """
    wins = tuple(parse_windows(windows))
    n_workers = workers or len(os.sched_getaffinity(0))
    jobs = ((str(p), wins, size, mode) for p in paths)
    if n_workers <= 1 or size is None:
        yield from map(_worker, jobs)
        return
    # Enough chunks per batch that no worker idles long at a batch boundary; two buffers so
    # the workers fill the next batch while this one is handed out.
    batch = n_workers * chunksize * 16
    shape = (batch, size, size, len(wins))
    buffers = [SharedMemory(create=True, size=int(np.prod(shape))) for _ in range(2)]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    out = None
    try:
        views = [np.ndarray(shape, dtype=np.uint8, buffer=b.buf) for b in buffers]
        with ctx.Pool(n_workers) as pool:

            def submit(which: int):  # -> (pending result, slots, buffer) or None
                slots = list(enumerate(job[0] for job in islice(jobs, batch)))
                if not slots:
                    return None
                tasks = [
                    (buffers[which].name, shape, slots[i : i + chunksize], wins, size, mode)
                    for i in range(0, len(slots), chunksize)
                ]
                return pool.map_async(_fill_slots, tasks), slots, which

            pending = submit(0)
            while pending is not None:
                result, slots, which = pending
                errors = dict(pair for part in result.get() for pair in part)
                pending = submit(1 - which)
                out = views[which]
                for slot, path in slots:
                    yield path, errors[slot] if slot in errors else out[slot].copy()
    finally:
        views = out = None  # release the buffer views before closing the segments
        for b in buffers:
            b.close()
            b.unlink()
