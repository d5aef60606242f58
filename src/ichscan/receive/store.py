"""The receiver's store on disk: durable instance writes, result JSONs, the analysis log, and
the scan that finds unfinished work after a restart.

Layout (other tools rely on it; see docs/receiver.md)::

    DIR/incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    DIR/results/<StudyInstanceUID>/<SeriesInstanceUID>.json      schema "ichscan.result/1"
    DIR/results/<StudyInstanceUID>/<SeriesInstanceUID>.sr.dcm    the Structured Report
    DIR/state/analysed.log                                       one line per finished analysis
    DIR/state/listen.lock                                        held by the running receiver

Every file is written the same way: a hidden temporary name in the same folder, fsync, rename
over the final name, fsync of the folder. A reader (or a process killed half-way) sees the old
file or the new one, never a torn one, and a file that exists under its final name survives a
power cut. Temporary names start with a dot so that series discovery (which skips dot files)
never reads a half-written instance.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ichscan.errors import IchscanError

SCHEMA = "ichscan.result/1"
PENDING = ("receiving", "queued", "analysing")
FINISHED = ("done", "failed")
STATUSES = (*PENDING, *FINISHED)

# UIDs become folder and file names: only what a UID (or a de-identified stand-in such as
# RSNA's "ID_abc") can hold, starting with a letter or digit, so that "..", "/" or a hidden
# name can never be smuggled in from the network.
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
_TMP_SUFFIX = ".tmp"


class StoreError(IchscanError):
    """The store folder cannot be used (not writable, not a folder...)."""


def is_safe_uid(value: str) -> bool:
    return bool(_SAFE_UID.match(value)) and ".." not in value


@dataclass(frozen=True)
class Store:
    root: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def analysed_log(self) -> Path:
        return self.state / "analysed.log"

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.incoming / study_uid / series_uid

    def result_path(self, study_uid: str, series_uid: str) -> Path:
        return self.results / study_uid / f"{series_uid}.json"

    def sr_path(self, study_uid: str, series_uid: str) -> Path:
        return self.results / study_uid / f"{series_uid}.sr.dcm"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def open_store(root: str | Path) -> Store:
    """The store at ``root``, its folders made (durably) when missing."""
    store = Store(Path(root).resolve())
    if store.root.exists() and not store.root.is_dir():
        raise StoreError(store.root, "--store must be a folder, this is a file")
    try:
        for folder in (store.incoming, store.results, store.state):
            make_dirs(folder)
        probe = store.state / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(store.root, f"cannot write to the store ({exc.strerror or exc})") from None
    return store


def lock_store(store: Store) -> BinaryIO:
    """Hold the store for this process (released when the returned file is closed, or by
    the kernel when the process dies, SIGKILL included): two receivers on one store would
    both recover and analyse the same series."""
    handle = open(store.state / "listen.lock", "ab")  # noqa: SIM115 (held until stop)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(store.root, "another ichscan listen is using this store") from None
    return handle


# ---------------------------------------------------------------------------------------
# Durable writes


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_dir_lock = threading.Lock()


def make_dirs(path: Path) -> None:
    """mkdir -p whose new entries are fsynced into their parents: a durable file inside a
    folder that itself vanished after a power cut would be lost all the same."""
    if path.is_dir():
        return
    with _dir_lock:  # two associations may create the same study folder at once
        missing: list[Path] = []
        cursor = path
        while not cursor.exists():
            missing.append(cursor)
            cursor = cursor.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            fsync_dir(folder.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp name, fsync, rename, fsync the folder."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_instance(
    store: Store, study_uid: str, series_uid: str, sop_uid: str, data: bytes
) -> bool:
    """Store one received instance durably; True when its SOPInstanceUID is new to the series
    (a resent instance replaces the stored one and is not counted again)."""
    folder = store.series_dir(study_uid, series_uid)
    make_dirs(folder)
    final = folder / f"{sop_uid}.dcm"
    existed = final.exists()
    write_atomic(final, data)
    return not existed


def instance_files(folder: Path) -> list[Path]:
    """The stored instances of one series (temporary files excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))


def remove_temporaries(folder: Path) -> int:
    """Delete what a killed process left half-written; nothing in them was acknowledged."""
    removed = 0
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------
# Result JSONs


def write_result(store: Store, record: dict[str, Any]) -> Path:
    path = store.result_path(record["study_instance_uid"], record["series_instance_uid"])
    make_dirs(path.parent)
    write_atomic(path, (json.dumps(record, indent=1, sort_keys=False) + "\n").encode())
    return path


def read_result(path: Path) -> dict[str, Any] | None:
    """A result JSON, or None when there is none. A file that does not parse (only a hand
    edit can do that: writes are atomic) is reported, not guessed at."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(path, f"corrupt result JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise StoreError(path, f"not an {SCHEMA} result")
    return record


def result_for(store: Store | str | Path, study_uid: str, series_uid: str) -> dict[str, Any]:
    """The result JSON of one series (what the worklist is built from)."""
    if not isinstance(store, Store):
        store = Store(Path(store).resolve())
    if not (is_safe_uid(study_uid) and is_safe_uid(series_uid)):
        raise StoreError(None, f"not a valid study/series UID: {study_uid!r}/{series_uid!r}")
    path = store.result_path(study_uid, series_uid)
    record = read_result(path)
    if record is None:
        raise StoreError(path, "no result for this series")
    return record


def iter_results(store: Store) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """Every result JSON as (path, record or None when unreadable)."""
    if not store.results.is_dir():
        return
    for path in sorted(store.results.glob("*/*.json")):
        try:
            yield path, read_result(path)
        except StoreError:
            yield path, None


# ---------------------------------------------------------------------------------------
# The analysis log: one line per analysis that reached a final state


_log_lock = threading.Lock()
LOG_FIELDS = ("finished_at", "study_instance_uid", "series_instance_uid", "generation", "status")


def append_analysed(store: Store, record: dict[str, Any]) -> None:
    """One tab-separated line, appended and fsynced: the proof that a series was analysed
    once per generation (the SIGKILL test and an operator can count them)."""
    line = "\t".join(str(record.get(k, "")) for k in LOG_FIELDS) + "\n"
    with _log_lock:
        fd = os.open(store.analysed_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def read_analysed(store: Store) -> list[dict[str, str]]:
    try:
        text = store.analysed_log.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == len(LOG_FIELDS):  # a torn last line (power cut mid-append) is skipped
            rows.append(dict(zip(LOG_FIELDS, parts, strict=True)))
    return rows


def reconcile_log(store: Store) -> int:
    """Append the line of any finished series the log lacks: the process can die between the
    result JSON's commit and the log append. Returns how many lines were added."""
    logged = {
        (r["study_instance_uid"], r["series_instance_uid"], r["generation"])
        for r in read_analysed(store)
    }
    added = 0
    for _, record in iter_results(store):
        if record is None or record.get("status") not in FINISHED:
            continue
        key = (
            record["study_instance_uid"],
            record["series_instance_uid"],
            str(record.get("generation", 1)),
        )
        if key not in logged:
            append_analysed(store, record)
            added += 1
    return added


# ---------------------------------------------------------------------------------------
# What a restart must pick up


@dataclass
class Unfinished:
    """A series with stored instances and no final result for all of them."""

    study_uid: str
    series_uid: str
    files: list[Path]
    record: dict[str, Any] | None  # its result JSON, when there is one
    reason: str


def find_unfinished(store: Store) -> tuple[list[Unfinished], list[str]]:
    """Series to analyse (again) after a restart, and one line per problem found on the way.

    A series is unfinished when its JSON is missing or says receiving/queued/analysing
    (analysing: the previous process died mid-analysis), or says done/failed but more
    instances are on disk than were analysed (killed between storing a new instance and
    re-opening the series). Half-written temporary files are deleted: none was acknowledged.
    """
    found: list[Unfinished] = []
    problems: list[str] = []
    if not store.incoming.is_dir():
        return found, problems
    for study_dir in sorted(p for p in store.incoming.iterdir() if p.is_dir()):
        for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
            study_uid, series_uid = study_dir.name, series_dir.name
            if not (is_safe_uid(study_uid) and is_safe_uid(series_uid)):
                problems.append(f"{series_dir}: not a study/series folder; left alone")
                continue
            removed = remove_temporaries(series_dir)
            if removed:
                problems.append(
                    f"{series_dir}: removed {removed} half-written file(s) (never acknowledged)"
                )
            files = instance_files(series_dir)
            if not files:
                continue
            try:
                record = read_result(store.result_path(study_uid, series_uid))
            except StoreError as exc:
                problems.append(f"{exc}; analysing the series again")
                record = None
            if record is None:
                reason = "no result yet"
            elif record.get("status") in PENDING:
                reason = f"was {record['status']}"
            elif len(files) != int(record.get("instances") or 0):
                reason = f"{len(files)} instances on disk, {record.get('instances')} analysed"
            else:
                continue
            found.append(Unfinished(study_uid, series_uid, files, record, reason))
    return found, problems
