"""The result record of one series (schema "ichscan.result/1"): made when its first instance
arrives, moved along receiving -> queued -> analysing -> done | failed, and filled with the
findings at the end. Pure functions over plain dicts; writing them is the store's job.

Beyond the shared schema the record carries ``generation`` (1, then +1 each time a finished
series is re-opened by new instances), ``warnings`` (what the reader noticed about the
series), ``association_aborted`` (null, or the association that ended without a release
after delivering part of the series: calling AE, instances, time) and ``completion``
(COMPLETE, or PARTIAL when analysed with that mark on, as the SR's CompletionFlag says);
readers of the schema may ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from ichscan.receive.store import SCHEMA, Store


def now_utc() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class InstanceInfo:
    """What the receiver keeps from one instance's header."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_description: str = ""
    series_description: str = ""
    study_date: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceInfo:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value).strip()

        return cls(
            study_uid=text("StudyInstanceUID"),
            series_uid=text("SeriesInstanceUID"),
            sop_uid=text("SOPInstanceUID"),
            sop_class=text("SOPClassUID"),
            patient_id=text("PatientID"),
            patient_name=text("PatientName"),
            accession_number=text("AccessionNumber"),
            study_description=text("StudyDescription"),
            series_description=text("SeriesDescription"),
            study_date=text("StudyDate"),
        )


def new_record(
    info: InstanceInfo,
    *,
    store: Store,
    calling_ae: str,
    labels: list[str],
    model: dict[str, str],
    arrived: datetime,
) -> dict[str, Any]:
    stamp = iso(arrived)
    return {
        "schema": SCHEMA,
        "status": "receiving",
        "study_instance_uid": info.study_uid,
        "series_instance_uid": info.series_uid,
        "patient_id": info.patient_id,
        "patient_name": info.patient_name,
        "accession_number": info.accession_number,
        "study_description": info.study_description,
        "series_description": info.series_description,
        "study_date": info.study_date,
        "calling_ae": calling_ae,
        "instances": 0,
        "arrived_at": stamp,
        "last_instance_at": stamp,
        "finished_at": None,
        "time_to_result_s": None,
        "labels": list(labels),
        "findings": {},
        "suspected_ich": None,
        "slices": None,
        "key_slice": None,
        "instances_dir": store.relative(store.series_dir(info.study_uid, info.series_uid)),
        "sr": None,
        "error": None,
        "model": dict(model),
        "generation": 1,
        "warnings": [],
        "association_aborted": None,
        "completion": None,
    }


def aborted_warning(mark: dict[str, Any]) -> str:
    """The warning of a series whose association ended without a release (its
    ``association_aborted`` mark)."""
    n = int(mark.get("instances") or 0)
    who = f" from {mark['calling_ae']}" if mark.get("calling_ae") else ""
    return (
        f"association{who} aborted after {n} instance{'s' if n != 1 else ''}; "
        "result may be incomplete"
    )


def reopen(record: dict[str, Any]) -> dict[str, Any]:
    """A finished series that receives a new instance goes back to receiving and will be
    analysed again. The previous findings stay until the new ones replace them, so a
    suspected bleed never drops off the worklist while its series is being completed."""
    return {**record, "status": "receiving", "generation": int(record.get("generation", 1)) + 1}


def findings(
    labels: list[str], probabilities: list[float], thresholds: list[float]
) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "probability": round(float(p), 6),
            "threshold": round(float(t), 6),
            "positive": bool(p >= t),
        }
        for name, p, t in zip(labels, probabilities, thresholds, strict=True)
    }


def finished_fields(
    record: dict[str, Any], status: str, finished: datetime, **fields: Any
) -> dict[str, Any]:
    """The fields that close an analysis: status, times and whatever the analysis found."""
    last = parse_iso(record["last_instance_at"])
    return {
        "status": status,
        "finished_at": iso(finished),
        "time_to_result_s": round((finished - last).total_seconds(), 3),
        **fields,
    }
