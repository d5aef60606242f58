"""The prepared-slice cache that training streams from: every manifest row windowed, resized
and stored once, so an epoch costs a memory read per slice instead of a DICOM decode.

Layout of a cache folder::

    CACHE/
      shards/shard-00000.npy   uint8 [n, size, size, C] (channels last), n <= shard_size
      shards/shard-00000.json  done marker: which rows the shard holds, ok flags, bad rows
      index.parquet            the manifest rows + shard, offset, ok (one row per slice)
      cache.json               windows, mode, size, channels, layout, label set, version, counts
      report.json              the rows that could not be read, with the reason
      .prepare.lock            while a prepare writes here: its process id and host

``cache.json`` is written last: its presence means the cache is complete and consistent.

Why plain ``.npy`` shards, memory-mapped:

- Training shuffles, so it needs cheap *random* access to any slice. ``np.load(mmap_mode="r")``
  gives that with no decoder, no copy and no extra dependency: a slice is a view of
  ``size*size*C`` contiguous bytes that the page cache serves and that forked DataLoader
  workers share.
- WebDataset tar shards are sequential by construction: shuffling means a shuffle buffer (a
  partial shuffle that costs memory) plus an image decode per sample.
- Zarr would add a dependency and a chunk codec; uint8 windowed slices at 256² are already
  small (192 KiB for three windows), and compressing them buys disk at the price of a decode
  in the training loop.
- One file per slice (PNG or .npy) would mean hundreds of thousands of small files; shards
  keep the file count in the hundreds and each write atomic (temp name, then rename).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichscan.errors import InputError

CACHE_FORMAT = "ichscan-slice-cache"
CACHE_FORMAT_VERSION = 1
SHARDS_DIR = "shards"
INDEX_FILE = "index.parquet"
FACTS_FILE = "cache.json"
REPORT_FILE = "report.json"
# Written by `ichscan prepare` beside the cache: the manifest with the adapter's facts.
MANIFEST_FILE = "manifest.parquet"
LOCK_FILE = ".prepare.lock"
CACHE_COLUMNS = ("shard", "offset", "ok")
LABEL_LEVELS = ("slice", "scan")


def shard_path(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS_DIR / f"shard-{shard:05d}.npy"


def marker_path(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS_DIR / f"shard-{shard:05d}.json"


def temp_path(path: Path) -> Path:
    """Where a file is written before its atomic rename: a name no reader looks for."""
    return path.with_name(f".{path.name}.tmp")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = temp_path(path)
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


class ShardWriter:
    """Streams slices into ``shard-XXXXX.npy`` one at a time, so a worker never holds more
    than one slice: the .npy header (whose shape is known up front) goes first, then the raw
    bytes in order. The file appears under its final name only when complete."""

    def __init__(self, path: Path, n: int, size: int, channels: int) -> None:
        self.path = path
        self.shape = (n, size, size, channels)
        self.tmp = temp_path(path)
        self.written = 0
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        header = {"descr": "|u1", "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._file, header)

    def write(self, slice_: np.ndarray) -> None:
        if slice_.shape != self.shape[1:] or slice_.dtype != np.uint8:
            raise ValueError(f"slice {slice_.shape} {slice_.dtype} does not fit {self.shape}")
        self._file.write(np.ascontiguousarray(slice_).data)
        self.written += 1

    def close(self) -> Path:
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: wrote {self.written} of {self.shape[0]} slices")
        self._file.flush()
        # Durable before it is visible: a crash must never leave a done-looking shard that
        # holds garbage (resume trusts a shard that exists with a matching marker).
        os.fsync(self._file.fileno())
        self._file.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def read_facts(root: str | Path) -> dict[str, Any]:
    """cache.json of a complete cache; InputError naming the folder when it is not one."""
    root = Path(root)
    path = root / FACTS_FILE
    if not root.is_dir():
        raise InputError(root, "cache folder not found")
    if not path.is_file():
        raise InputError(
            root, f"not a prepared cache (no {FACTS_FILE}; run `ichscan prepare` to make one)"
        )
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable cache description ({exc})") from None
    if not isinstance(facts, dict) or facts.get("format") != CACHE_FORMAT:
        raise InputError(path, f"not an ichscan cache description (format is not {CACHE_FORMAT})")
    if facts.get("format_version") != CACHE_FORMAT_VERSION:
        raise InputError(
            path,
            f"cache format version {facts.get('format_version')} is not the supported "
            f"{CACHE_FORMAT_VERSION}; prepare it again with --overwrite",
        )
    return facts


@contextmanager
def prepare_lock(root: Path) -> Iterator[Path]:
    """Hold the cache folder's lock while preparing into it. Two runs on one folder would
    share temp names: one unlinks the other's half-written shard and the other then marks a
    shard done that it never finished. A lock left by a process that is gone is taken over."""
    lock = root / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname()}
    # The holder is written whole before the lock appears (a hard link is atomic and fails
    # when the lock exists): a lock read while being written would look stale and be taken.
    mine = lock.with_name(f"{LOCK_FILE}.{holder['pid']}.tmp")
    mine.write_text(json.dumps(holder))
    try:
        while True:
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                _refuse_or_clear(lock, holder["host"])
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _refuse_or_clear(lock: Path, host: str) -> None:
    """InputError naming the lock and its holder when that process may still be running;
    else remove the stale lock."""
    try:
        owner = json.loads(lock.read_text())
        pid, owner_host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return  # let go between our attempt and this read: try again
    except (OSError, ValueError, KeyError, TypeError):
        pid, owner_host = None, host  # unreadable: not written by a live prepare
    if pid is not None and (owner_host != host or _running(pid)):
        where = f" on {owner_host}" if owner_host != host else ""
        raise InputError(
            lock,
            f"another ichscan prepare (pid {pid}{where}) is writing this cache; wait for it "
            "to finish, or delete this file if that process is gone",
        )
    lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class PreparedCache:
    """A prepared cache opened for reading: ``cache[i]`` is slice i of the index as a
    read-only ``[size, size, C]`` uint8 view of its memory-mapped shard.

    Shards are mapped lazily, on first access, and the maps are dropped when the object is
    pickled, so a DataLoader may hand it to spawned or forked workers and each maps its own.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.facts: dict[str, Any] = read_facts(self.root)
        try:
            self.index: pd.DataFrame = pd.read_parquet(self.root / INDEX_FILE)
        except (OSError, ValueError) as exc:
            raise InputError(self.root / INDEX_FILE, f"unreadable cache index ({exc})") from None
        missing = [c for c in (*CACHE_COLUMNS, *self.label_names) if c not in self.index]
        if missing:
            raise InputError(self.root / INDEX_FILE, f"cache index lacks {', '.join(missing)}")
        self.size = int(self.facts["size"])
        self.channels = int(self.facts["channels"])
        # Caches from before the head crop existed hold uncropped slices.
        self.crop = str(self.facts.get("crop", "none"))
        # Caches cut before crop versions were recorded hold version 1 crops.
        self.crop_version = int(self.facts.get("crop_version", 1)) if self.crop != "none" else None
        self._shard = self.index["shard"].to_numpy(np.int64)
        self._offset = self.index["offset"].to_numpy(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @staticmethod
    def is_cache(path: str | Path) -> bool:
        try:
            read_facts(path)
        except InputError:
            return False
        return True

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.facts["labels"])

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: False for rows that could not be read (their pixels are all zero)."""
        return self.index["ok"].to_numpy(bool)

    @property
    def label_level(self) -> str:
        """Whether the labels are per "slice" (each row's own) or per "scan" (its scan's,
        copied onto every slice: CQ500 reads, NIfTI labels.csv)."""
        return label_level(self.facts, self.root)

    @property
    def slice_spacing_mm(self) -> float | None:
        """The spacing of the cached scans' slices (see :func:`slice_spacing_mm`)."""
        return slice_spacing_mm(self.index)

    def labels(self) -> np.ndarray:
        """int8 [N, L] in label-set order: 1 present, 0 absent, -1 unknown."""
        return self.index[list(self.label_names)].to_numpy(np.int8)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"slice {i} out of range for a cache of {n}")
        return self._map(int(self._shard[i]))[self._offset[i]]

    def _map(self, shard: int) -> np.ndarray:
        arr = self._maps.get(shard)
        if arr is None:
            path = shard_path(self.root, shard)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(path, f"missing or unreadable shard ({exc})") from None
            expected = (self.size, self.size, self.channels)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != expected:
                raise InputError(
                    path, f"shard holds {arr.dtype} {arr.shape}, expected uint8 [n, *{expected}]"
                )
            self._maps[shard] = arr
        return arr

    def close(self) -> None:
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"PreparedCache({str(self.root)!r}, {len(self)} slices, "
            f"{self.size}x{self.size}x{self.channels})"
        )


def label_level(facts: dict[str, Any], root: str | Path | None = None) -> str:
    """The label level of a cache from its cache.json `facts`. A cache prepared before
    cache.json carried it falls back to the manifest.parquet that `ichscan prepare` wrote
    beside it (in `root`), else to per slice."""
    recorded = facts.get("manifest", {}).get("label_level")
    if recorded is None and root is not None:
        recorded = _manifest_label_level(Path(root) / MANIFEST_FILE)
    return recorded if recorded in LABEL_LEVELS else "slice"


def _manifest_label_level(path: Path) -> str | None:
    import pyarrow.parquet as pq

    from ichscan.data.manifest import META_KEY

    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
        return json.loads(raw).get("label_level") if raw else None
    except (OSError, ValueError, AttributeError):
        return None


def slice_spacing_mm(index: pd.DataFrame) -> float | None:
    """The median slice spacing of the scans in a manifest or cache index, in mm: what a
    model trained on them read, so that prediction can reslice a thinner series to it. Only
    scans of 3 or more slices in an even run count (smallest gap within 10% of the median):
    a few slices sampled from a series, as the RSNA sets are, would otherwise pass their gaps
    off as slice spacing. None when no scan counts (image sets, single slices)."""
    known = index.loc[np.isfinite(index["position_mm"].to_numpy(float))]
    spacings = []
    for _, positions in known.groupby("scan_id", sort=False)["position_mm"]:
        gaps = np.diff(np.unique(positions.to_numpy(float)))
        gaps = gaps[gaps > 0.05]
        if len(gaps) >= 2 and gaps.min() >= 0.9 * np.median(gaps):
            spacings.append(float(np.median(gaps)))
    return round(float(np.median(spacings)), 3) if spacings else None
