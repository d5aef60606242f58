"""The triage worklist, read from the DICOM receiver's store (``ichscan listen --store DIR``).

The receiver writes one JSON per series, ``DIR/results/<Study>/<Series>.json`` (schema
``ichscan.result/1``), and the instances under ``DIR/incoming/<Study>/<Series>/``. This
module only reads: one worklist entry per study with its series nested, most urgent first —
studies with a suspected ICH, then the rest, each group oldest arrival first (the longest
waiting is read first). A file that cannot be used is left out and named in ``problems``;
one bad file never hides the others. A series the receiver analysed from a transfer its
sender aborted (``completion`` PARTIAL) is marked ``partial``, and so is its study: it is
shown, a suspected bleed first as always, but not as a final result.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from ichscan.models.bundle import is_synthetic_line

SCHEMA = "ichscan.result/1"
STATUSES = ("receiving", "queued", "analysing", "done", "failed")
PENDING = ("receiving", "queued", "analysing")
# The receiver names folders by UID, allowing what a UID or a de-identified stand-in (RSNA's
# "ID_abc") holds and nothing that could climb out of the store: the same rule here.
UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
_STUDY_FIELDS = (
    "patient_id",
    "patient_name",
    "accession_number",
    "study_description",
    "study_date",
)


class StoreError(Exception):
    """A store series that cannot be opened: the HTTP status and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def valid_uid(uid: str) -> bool:
    return bool(UID.match(uid)) and ".." not in uid


def _arrival(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("arrived_at is missing")
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        raise ValueError(f"arrived_at {value!r} has no time zone")
    return stamp


def read_result(path: Path) -> dict[str, Any]:
    """One series record, checked enough to sort and show it; ValueError says what is wrong."""
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if record.get("schema") != SCHEMA:
        raise ValueError(f"schema is {record.get('schema')!r}, expected {SCHEMA!r}")
    if record.get("status") not in STATUSES:
        raise ValueError(f"status {record.get('status')!r} is not one of {', '.join(STATUSES)}")
    for key in ("study_instance_uid", "series_instance_uid"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"{key} is missing")
    _arrival(record.get("arrived_at"))
    return record


def _series_entry(record: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "series_instance_uid",
        "series_description",
        "status",
        "instances",
        "arrived_at",
        "last_instance_at",
        "finished_at",
        "time_to_result_s",
        "labels",
        "findings",
        "suspected_ich",
        "slices",
        "key_slice",
        "error",
        "model",
        "calling_ae",
        "completion",
        "warnings",
    )
    entry = {key: record.get(key) for key in keys}
    trained = (record.get("model") or {}).get("trained_on")
    entry["trained_on"] = trained
    entry["trained_on_synthetic"] = is_synthetic_line(trained)
    # A series analysed from a transfer its sender aborted is no final result.
    entry["partial"] = record.get("status") == "done" and record.get("completion") == "PARTIAL"
    return entry


def _study_status(statuses: list[str]) -> str:
    pending = [s for s in PENDING if s in statuses]
    if pending:
        return pending[0]
    return "done" if "done" in statuses else "failed"


def _suspected(series: list[dict[str, Any]]) -> bool | None:
    values = [s["suspected_ich"] for s in series if s["status"] == "done"]
    if any(v is True for v in values):
        return True
    if any(v is False for v in values):
        return False
    return None


def _merged_findings(series: list[dict[str, Any]]) -> dict[str, Any]:
    """Per label, the series with the highest probability (a study is as positive as its
    most positive series)."""
    merged: dict[str, Any] = {}
    for s in series:
        for label, finding in (s.get("findings") or {}).items():
            if not isinstance(finding, dict):
                continue
            best = merged.get(label)
            if best is None or finding.get("probability", 0) > best.get("probability", 0):
                merged[label] = dict(finding)
    return merged


def _study_entry(records: list[dict[str, Any]]) -> dict[str, Any]:
    records = sorted(records, key=lambda r: _arrival(r["arrived_at"]))
    series = [_series_entry(r) for r in records]
    first = records[0]
    finished = [s["finished_at"] for s in series]
    times = [
        s["time_to_result_s"] for s in series if isinstance(s["time_to_result_s"], int | float)
    ]
    status = _study_status([s["status"] for s in series])
    labels = next((s["labels"] for s in series if s.get("labels")), [])
    return {
        "study_instance_uid": first["study_instance_uid"],
        **{key: next((r.get(key) for r in records if r.get(key)), "") for key in _STUDY_FIELDS},
        "status": status,
        "suspected_ich": _suspected(series),
        "arrived_at": first["arrived_at"],
        "last_instance_at": max(
            (s["last_instance_at"] for s in series if s["last_instance_at"]), default=None
        ),
        "finished_at": max(finished) if finished and all(finished) else None,
        "time_to_result_s": max(times) if times else None,
        "labels": labels,
        "findings": _merged_findings(series),
        "partial": any(s["partial"] for s in series),
        "trained_on": next((s["trained_on"] for s in series if s["trained_on"]), None),
        "trained_on_synthetic": any(s["trained_on_synthetic"] for s in series),
        "series": series,
    }


def urgency_key(study: dict[str, Any]) -> tuple[int, datetime, str]:
    return (
        0 if study["suspected_ich"] is True else 1,
        _arrival(study["arrived_at"]),
        study["study_instance_uid"],
    )


def read_worklist(store: str | Path) -> dict[str, Any]:
    """``{"studies": [...], "problems": [...]}``, studies most urgent first."""
    root = Path(store)
    results = root / "results"
    by_study: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    paths = sorted(results.glob("*/*.json")) if results.is_dir() else []
    for path in paths:
        shown = path.relative_to(root).as_posix()
        try:
            record = read_result(path)
        except ValueError as exc:
            problems.append(f"{shown}: {exc}")
            continue
        by_study.setdefault(record["study_instance_uid"], []).append(record)
    studies = sorted((_study_entry(r) for r in by_study.values()), key=urgency_key)
    return {"studies": studies, "problems": problems}


def series_folder(
    store: str | Path, study_uid: str, series_uid: str
) -> tuple[Path, dict[str, Any]]:
    """The instances folder of one store series (from its result's ``instances_dir``,
    checked to stay inside the store) and the record. StoreError 404/422 otherwise."""
    if not (valid_uid(study_uid) and valid_uid(series_uid)):
        raise StoreError(404, "no such series in the store (not a UID)")
    root = Path(store).resolve()
    path = root / "results" / study_uid / f"{series_uid}.json"
    if not path.is_file():
        raise StoreError(404, f"no series {series_uid} of study {study_uid} in the store")
    try:
        record = read_result(path)
    except ValueError as exc:
        raise StoreError(422, f"results/{study_uid}/{series_uid}.json: {exc}") from None
    relative = record.get("instances_dir")
    if not isinstance(relative, str) or not relative:
        raise StoreError(422, f"results/{study_uid}/{series_uid}.json has no instances_dir")
    folder = (root / relative).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise StoreError(422, f"instances_dir {relative!r} points outside the store")
    if not folder.is_dir():
        raise StoreError(422, f"instances_dir {relative!r} is not a folder in the store")
    return folder, record
