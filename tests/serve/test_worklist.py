"""The worklist read from a receiver store written here by hand, per the shared contract:
studies most urgent first, series nested, bad result files named and skipped, and a store
series opened in the viewer from its instances folder (kept inside the store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import wait_done

from ichscan.io.load import load
from ichscan.serve.worklist import read_worklist, series_folder, valid_uid

pytest_plugins = ["serve_fixtures"]
pytestmark = [pytest.mark.usefixtures("single_threaded_torch"), pytest.mark.timeout(120)]

LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def result(
    study: str,
    series: str,
    *,
    status: str = "done",
    suspected: bool | None = None,
    arrived: str = "2026-03-01T10:00:00.000Z",
    **extra: Any,
) -> dict[str, Any]:
    """One series record in schema ichscan.result/1."""
    done = status == "done"
    p_any = 0.9 if suspected else 0.1
    record = {
        "schema": "ichscan.result/1",
        "status": status,
        "study_instance_uid": study,
        "series_instance_uid": series,
        "patient_id": f"P-{study[-3:]}",
        "patient_name": f"Doe^{study[-3:]}",
        "accession_number": f"A{study[-3:]}",
        "study_description": "CT head",
        "series_description": f"axial {series[-2:]}",
        "study_date": "20260301",
        "calling_ae": "SCANNER1",
        "instances": 8,
        "arrived_at": arrived,
        "last_instance_at": arrived.replace(":00.000Z", ":20.000Z"),
        "finished_at": "2026-03-01T10:01:00.000Z" if done else None,
        "time_to_result_s": 4.5 if done else None,
        "labels": LABELS,
        "findings": (
            {
                label: {"probability": p_any, "threshold": 0.5, "positive": bool(suspected)}
                for label in LABELS
            }
            if done
            else {}
        ),
        "suspected_ich": suspected if done else None,
        "slices": 8 if done else None,
        "key_slice": {"index": 3, "sop_instance_uid": "1.2.3", "probability": p_any}
        if done
        else None,
        "instances_dir": f"incoming/{study}/{series}",
        "sr": f"results/{study}/{series}.sr.dcm" if done else None,
        "error": None,
        "model": {"architecture": "resnet18", "labels": "rsna"},
    }
    record.update(extra)
    return record


def write_result(store: Path, record: dict[str, Any]) -> Path:
    path = (
        store / "results" / record["study_instance_uid"] / f"{record['series_instance_uid']}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def store(tmp_path: Path, series_dir: Path) -> Path:
    """Four studies, one with a real synthetic series under incoming/, and two bad files."""
    root = tmp_path / "store"
    real = load(series_dir)
    # Arrival order: C 09:00, B 10:00, D 10:01, A 10:05; suspected: A and D.
    write_result(
        root,
        result(
            "1.2.840.1.100", "1.2.840.1.100.1", suspected=False, arrived="2026-03-01T10:00:00.000Z"
        ),
    )
    write_result(
        root,
        result(
            "1.2.840.1.200",
            "1.2.840.1.200.1",
            status="receiving",
            arrived="2026-03-01T09:00:00.000Z",
        ),
    )
    write_result(
        root,
        result(real.study_uid, real.series_uid, suspected=True, arrived="2026-03-01T10:05:00.000Z"),
    )
    write_result(
        root,
        result(
            "1.2.840.1.400", "1.2.840.1.400.1", suspected=False, arrived="2026-03-01T10:01:00.000Z"
        ),
    )
    write_result(
        root,
        result(
            "1.2.840.1.400", "1.2.840.1.400.2", suspected=True, arrived="2026-03-01T10:02:00.000Z"
        ),
    )
    incoming = root / "incoming" / real.study_uid / real.series_uid
    incoming.mkdir(parents=True)
    for path in sorted(series_dir.glob("*.dcm")):
        shutil.copy(path, incoming / path.name)
    (root / "results" / "1.2.840.1.999").mkdir()
    (root / "results" / "1.2.840.1.999" / "1.2.840.1.999.1.json").write_text("{not json")
    write_result(root, {**result("1.2.840.1.998", "1.2.840.1.998.1"), "schema": "other/2"})
    return root


def test_studies_sorted_by_urgency_then_arrival(store: Path, series_dir: Path) -> None:
    worklist = read_worklist(store)
    real = load(series_dir)
    order = [s["study_instance_uid"] for s in worklist["studies"]]
    # Suspected first (D arrived 10:01, A 10:05), then the rest oldest first (C 09:00, B 10:00).
    assert order == ["1.2.840.1.400", real.study_uid, "1.2.840.1.200", "1.2.840.1.100"]
    assert [s["suspected_ich"] for s in worklist["studies"]] == [True, True, None, False]


def test_series_nested_in_their_study(store: Path) -> None:
    study = read_worklist(store)["studies"][0]
    assert study["study_instance_uid"] == "1.2.840.1.400"
    assert [s["series_instance_uid"] for s in study["series"]] == [
        "1.2.840.1.400.1",
        "1.2.840.1.400.2",
    ]
    assert study["patient_id"] == "P-400" and study["patient_name"] == "Doe^400"
    assert study["accession_number"] == "A400"
    assert study["arrived_at"] == "2026-03-01T10:01:00.000Z"
    assert study["time_to_result_s"] == 4.5
    assert study["status"] == "done"
    # A study is as positive as its most positive series.
    assert study["findings"]["any"] == {"probability": 0.9, "threshold": 0.5, "positive": True}


def test_pending_study_status(store: Path) -> None:
    receiving = next(
        s for s in read_worklist(store)["studies"] if s["study_instance_uid"] == "1.2.840.1.200"
    )
    assert receiving["status"] == "receiving"
    assert receiving["time_to_result_s"] is None and receiving["findings"] == {}


def test_bad_result_files_are_named_and_skipped(store: Path) -> None:
    worklist = read_worklist(store)
    assert len(worklist["studies"]) == 4
    problems = worklist["problems"]
    assert len(problems) == 2
    assert any(
        p.startswith("results/1.2.840.1.999/1.2.840.1.999.1.json: not valid JSON") for p in problems
    )
    assert any("schema is 'other/2'" in p for p in problems)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"status": "lost"}, "status 'lost'"),
        ({"arrived_at": None}, "arrived_at is missing"),
        ({"arrived_at": "yesterday"}, "Invalid isoformat"),
        ({"arrived_at": "2026-03-01T10:00:00"}, "no time zone"),
        ({"study_instance_uid": ""}, "study_instance_uid is missing"),
    ],
)
def test_each_schema_problem_is_reported(tmp_path: Path, change: dict, problem: str) -> None:
    path = tmp_path / "results" / "1.2.3" / "1.2.3.4.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**result("1.2.3", "1.2.3.4"), **change}))
    worklist = read_worklist(tmp_path)
    assert worklist["studies"] == []
    assert worklist["problems"][0].startswith("results/1.2.3/1.2.3.4.json: ")
    assert problem in worklist["problems"][0]


def test_empty_or_new_store(tmp_path: Path) -> None:
    assert read_worklist(tmp_path) == {"studies": [], "problems": []}


def test_series_folder_stays_inside_the_store(
    store: Path, series_dir: Path, tmp_path: Path
) -> None:
    real = load(series_dir)
    folder, record = series_folder(store, real.study_uid, real.series_uid)
    assert folder == (store / "incoming" / real.study_uid / real.series_uid).resolve()
    assert record["suspected_ich"] is True

    from ichscan.serve.worklist import StoreError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for instances_dir in ["../elsewhere", str(outside), "incoming/../../elsewhere", "."]:
        write_result(store, result("1.2.9", "1.2.9.1", instances_dir=instances_dir))
        with pytest.raises(StoreError) as info:
            series_folder(store, "1.2.9", "1.2.9.1")
        assert info.value.status == 422 and "outside the store" in info.value.detail
    write_result(store, result("1.2.9", "1.2.9.2", instances_dir="incoming/1.2.9/missing"))
    with pytest.raises(StoreError, match="not a folder"):
        series_folder(store, "1.2.9", "1.2.9.2")
    with pytest.raises(StoreError) as info:
        series_folder(store, "1.2.9", "1.2.9.404")
    assert info.value.status == 404


@pytest.mark.parametrize("uid", ["..", "../x", "a/b", ".hidden", "", "1" * 65, "a..b"])
def test_uids_that_could_name_a_path_are_refused(uid: str) -> None:
    assert not valid_uid(uid)


@pytest.mark.parametrize("uid", ["1.2.840.113619.2.55", "ID_0fe31b044", "1.2-3_4"])
def test_uids_the_receiver_uses_are_accepted(uid: str) -> None:
    assert valid_uid(uid)


# -- through the API --------------------------------------------------------------------------


def test_worklist_api(make_client, store: Path) -> None:
    client = make_client(store=store, token="t")
    headers = {"Authorization": "Bearer t"}
    assert client.get("/api/worklist").status_code == 401
    body = client.get("/api/worklist", headers=headers).json()
    assert [s["study_instance_uid"] for s in body["studies"]] == [
        s["study_instance_uid"] for s in read_worklist(store)["studies"]
    ]
    assert len(body["problems"]) == 2
    assert client.get("/api/health").json()["worklist"] is True


def test_no_store_no_worklist(make_client) -> None:
    client = make_client()
    response = client.get("/api/worklist")
    assert response.status_code == 404 and "--store" in response.json()["detail"]
    assert client.post("/api/worklist/1.2/1.2.3/open").status_code == 404


def test_open_a_store_series_in_the_viewer(make_client, store: Path, series_dir: Path) -> None:
    real = load(series_dir)
    client = make_client(store=store, inline_wait_s=0.0)
    response = client.post(f"/api/worklist/{real.study_uid}/{real.series_uid}/open")
    assert response.status_code == 201, response.text
    record = wait_done(client, response.json()["id"])
    assert record["status"] == "done"
    assert record["series"]["series_uid"] == real.series_uid
    assert record["series"]["n_slices"] == 8
    assert record["origin"]["series_instance_uid"] == real.series_uid
    assert record["store_result"]["suspected_ich"] is True
    assert (
        record["name"]
        == "Doe^" + real.study_uid[-3:] + " / CT head / axial " + real.series_uid[-2:]
    )
    assert record["upload"]["kind"] == "store"
    assert client.get(f"/api/scans/{record['id']}/slices/0.png?window=bone").status_code == 200
    # The instances are read where they are: nothing copied into the scan folder.
    assert not (client.app.state.scans.folder(record["id"]) / "upload").exists()
    # Opening it again gives the same scan while the series has not grown.
    again = client.post(f"/api/worklist/{real.study_uid}/{real.series_uid}/open")
    assert again.status_code == 200 and again.json()["id"] == record["id"]


def test_opening_what_cannot_be_opened(make_client, store: Path, tmp_path: Path) -> None:
    client = make_client(store=store)
    assert client.post("/api/worklist/1.2.840.1.100/1.2.840.1.100.9/open").status_code == 404
    assert client.post("/api/worklist/..%2F..%2Fetc/x/open").status_code == 404
    # A series whose instances never arrived: its folder is absent.
    missing = client.post("/api/worklist/1.2.840.1.100/1.2.840.1.100.1/open")
    assert missing.status_code == 422 and "not a folder" in missing.json()["detail"]
    write_result(store, result("1.2.9", "1.2.9.1", instances_dir="../.."))
    outside = client.post("/api/worklist/1.2.9/1.2.9.1/open")
    assert outside.status_code == 422 and "outside the store" in outside.json()["detail"]
    # Files that are not CT: 422 with the reason, store paths not shown.
    junk = store / "incoming" / "1.2.8" / "1.2.8.1"
    junk.mkdir(parents=True)
    (junk / "x.dcm").write_bytes(b"not dicom")
    write_result(store, result("1.2.8", "1.2.8.1"))
    bad = client.post("/api/worklist/1.2.8/1.2.8.1/open")
    assert bad.status_code == 422
    assert str(store.resolve()) not in bad.json()["detail"]
    assert "store/incoming/1.2.8/1.2.8.1/x.dcm" in bad.json()["detail"]
    assert client.get("/api/scans").json()["scans"] == []


def test_a_partial_series_is_not_shown_as_final(tmp_path: Path, make_client) -> None:
    """R-1: a series the receiver analysed from an aborted association (completion PARTIAL)
    is marked partial, and so is its study; the synthetic training shows beside it."""
    root = tmp_path / "partial-store"
    synthetic = "SYNTHETIC phantoms at /data/synth (48 slices, 6 patients)"
    warning = "association from CT1 aborted after 5 instances; result may be incomplete"
    model = {"architecture": "resnet18", "labels": "rsna", "trained_on": synthetic}
    write_result(
        root,
        result(
            "1.2.840.1.500",
            "1.2.840.1.500.1",
            suspected=True,
            completion="PARTIAL",
            warnings=[warning],
            model=model,
        ),
    )
    write_result(
        root,
        result("1.2.840.1.600", "1.2.840.1.600.1", suspected=False, completion="COMPLETE"),
    )
    partial, whole = read_worklist(root)["studies"]
    assert partial["suspected_ich"] is True  # still first: a bleed is never hidden
    assert partial["partial"] is True and partial["series"][0]["partial"] is True
    assert partial["series"][0]["warnings"] == [warning]
    assert partial["series"][0]["completion"] == "PARTIAL"
    assert partial["trained_on"] == synthetic and partial["trained_on_synthetic"] is True
    assert whole["partial"] is False and whole["trained_on_synthetic"] is False
    # The viewer's script says it in the worklist and beside an opened series.
    client = make_client(store=root)
    assert client.get("/api/worklist").json()["studies"][0]["partial"] is True
    script = client.get("/static/app.js").text
    assert "PARTIAL: transfer aborted, not final" in script
    assert 'store.completion !== "PARTIAL"' in script
