"""The web app's scans on disk: one folder per scan, its state in one JSON file.

``DATA/scans/<id>/`` holds ``upload/`` (the files as received, under server-chosen names),
``result.json`` (status, series info, probabilities; written atomically at every change),
``volume.npy`` (the slices the model read, which the viewer shows), ``input.npy`` (the
model's input, for Grad-CAM) and ``cache/`` (rendered PNGs and heatmaps). Ids are uuid4 hex
made here and checked against one pattern wherever an id arrives from outside, so an id can
never name a path. A restart lists every scan again and queues the unfinished ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
RESULT = "result.json"
QUEUED, PROCESSING, DONE, FAILED = "queued", "processing", "done", "failed"
UNFINISHED = (QUEUED, PROCESSING)
# What the scan list shows of each scan (the full record can be large: per-slice values).
SUMMARY_KEYS = (
    "id",
    "status",
    "name",
    "created_at",
    "finished_at",
    "kind",
    "n_slices",
    "suspected_ich",
    "headline_label",
    "headline_probability",
    "trained_on_synthetic",
    "origin",
    "error",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(scan_id: str) -> bool:
    return bool(ID_PATTERN.match(scan_id))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    series = record.get("series") or {}
    out = {key: record.get(key) for key in SUMMARY_KEYS}
    out["kind"] = (record.get("upload") or {}).get("kind")
    out["n_slices"] = series.get("n_slices")
    return out


class ScanStore:
    """Scan folders under ``DATA/scans`` and an in-memory index of their summaries (the
    worker thread and the request threads both write, hence the lock)."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir) / "scans"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, Any]] = {}
        self._load_index()

    def _load_index(self) -> None:
        for folder in self.root.iterdir():
            if not folder.is_dir() or not valid_id(folder.name):
                continue
            try:
                record = json.loads((folder / RESULT).read_text())
            except (OSError, ValueError):
                # An upload cut short (no result.json yet) or a damaged record: nothing a user
                # can open; the folder goes.
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._index[folder.name] = summary(record)

    def folder(self, scan_id: str) -> Path:
        if not valid_id(scan_id):
            raise KeyError(scan_id)
        return self.root / scan_id

    def new_folder(self) -> tuple[str, Path]:
        scan_id = new_id()
        folder = self.root / scan_id
        folder.mkdir()
        return scan_id, folder

    def exists(self, scan_id: str) -> bool:
        return valid_id(scan_id) and scan_id in self._index

    def read(self, scan_id: str) -> dict[str, Any]:
        """The full record; KeyError for an unknown or malformed id."""
        if not self.exists(scan_id):
            raise KeyError(scan_id)
        return json.loads((self.folder(scan_id) / RESULT).read_text())

    def read_bytes(self, scan_id: str) -> bytes:
        """The record as stored (JSON): what a poll gets, without decoding it first."""
        if not self.exists(scan_id):
            raise KeyError(scan_id)
        return (self.folder(scan_id) / RESULT).read_bytes()

    def write(self, record: dict[str, Any]) -> None:
        scan_id = record["id"]
        with self._lock:
            write_json_atomic(self.folder(scan_id) / RESULT, record)
            self._index[scan_id] = summary(record)

    def update(self, scan_id: str, **changes: Any) -> dict[str, Any]:
        with self._lock:
            record = json.loads((self.folder(scan_id) / RESULT).read_text())
            record.update(changes)
            write_json_atomic(self.folder(scan_id) / RESULT, record)
            self._index[scan_id] = summary(record)
        return record

    def status(self, scan_id: str) -> str | None:
        entry = self._index.get(scan_id)
        return entry["status"] if entry else None

    def list(self) -> list[dict[str, Any]]:
        """Summaries, newest first."""
        with self._lock:
            entries = list(self._index.values())
        return sorted(entries, key=lambda e: e.get("created_at") or "", reverse=True)

    def unfinished(self) -> list[str]:
        """Ids of scans a previous run left queued or processing, oldest first."""
        return [e["id"] for e in reversed(self.list()) if e["status"] in UNFINISHED]

    def find_origin(self, origin: dict[str, Any]) -> str | None:
        """The newest scan opened from the same place (a store series), unless it failed."""
        for entry in self.list():
            if entry.get("origin") == origin and entry["status"] != FAILED:
                return entry["id"]
        return None

    def remove(self, scan_id: str) -> None:
        with self._lock:
            self._index.pop(scan_id, None)
        if valid_id(scan_id):
            shutil.rmtree(self.root / scan_id, ignore_errors=True)
