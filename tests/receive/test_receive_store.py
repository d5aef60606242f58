"""The store: durable, atomic writes under UID names that cannot escape the store, result
JSONs, the analysis log, and what a restart finds unfinished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ichscan.receive.result import InstanceInfo, finished_fields, new_record, now_utc
from ichscan.receive.store import (
    StoreError,
    append_analysed,
    find_unfinished,
    is_safe_uid,
    open_store,
    read_analysed,
    reconcile_log,
    result_for,
    write_instance,
    write_result,
)

pytestmark = pytest.mark.timeout(30)

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"


def _record(store, status="receiving", instances=0, **extra):
    info = InstanceInfo(STUDY, SERIES, "1.2.3.4.5.1", "1.2.840.10008.5.1.4.1.1.2", "P1")
    record = new_record(
        info,
        store=store,
        calling_ae="SCU",
        labels=["any", "subdural"],
        model={"architecture": "resnet18", "labels": "rsna"},
        arrived=now_utc(),
    )
    return {**record, "status": status, "instances": instances, **extra}


def test_store_layout_is_made_on_open(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s")
    assert store.incoming.is_dir() and store.results.is_dir() and store.state.is_dir()
    assert store.series_dir(STUDY, SERIES) == store.root / "incoming" / STUDY / SERIES
    assert store.result_path(STUDY, SERIES).name == f"{SERIES}.json"
    assert store.sr_path(STUDY, SERIES).name == f"{SERIES}.sr.dcm"


def test_store_that_is_a_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="must be a folder"):
        open_store(tmp_path / "f")


def test_instance_written_under_its_final_name_only(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert write_instance(store, STUDY, SERIES, "1.2.3.4.5.1", b"first") is True
    folder = store.series_dir(STUDY, SERIES)
    assert [p.name for p in folder.iterdir()] == ["1.2.3.4.5.1.dcm"]
    # The same SOP instance again replaces the file: never a second copy, not "new".
    assert write_instance(store, STUDY, SERIES, "1.2.3.4.5.1", b"second") is False
    assert [p.read_bytes() for p in folder.iterdir()] == [b"second"]


@pytest.mark.parametrize("uid", ["..", "../etc", "a/b", ".hidden", "", "1.2..3/..", "x" * 65])
def test_unsafe_uids_are_refused(uid: str) -> None:
    assert not is_safe_uid(uid)


@pytest.mark.parametrize("uid", ["1.2.840.113619.2.55.3", "ID_7a8b9c", "1.2.3-4_5"])
def test_real_uids_are_accepted(uid: str) -> None:
    assert is_safe_uid(uid)


def test_result_round_trip_and_result_for(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    record = _record(store)
    write_result(store, record)
    assert result_for(tmp_path, STUDY, SERIES) == record
    assert result_for(store, STUDY, SERIES)["schema"] == "ichscan.result/1"
    assert not list(store.results.glob("*/.*")), "no temporary file is left behind"
    with pytest.raises(StoreError, match="no result"):
        result_for(store, STUDY, "9.9")
    with pytest.raises(StoreError, match="not a valid"):
        result_for(store, "..", SERIES)


def test_finished_fields_time_to_result(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    record = _record(store)
    fields = finished_fields(record, "done", now_utc())
    assert fields["status"] == "done"
    assert 0 <= fields["time_to_result_s"] < 5
    assert fields["finished_at"].endswith("Z")


def test_analysed_log_appends_and_skips_a_torn_line(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    append_analysed(store, {**_record(store, "done"), "finished_at": "t"})
    with open(store.analysed_log, "a") as f:
        f.write("torn-line-without-tabs")
    rows = read_analysed(store)
    assert len(rows) == 1
    assert rows[0]["series_instance_uid"] == SERIES and rows[0]["generation"] == "1"


def test_reconcile_adds_the_line_a_crash_lost_once(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    write_result(store, _record(store, "done", instances=1))
    assert reconcile_log(store) == 1
    assert reconcile_log(store) == 0
    assert len(read_analysed(store)) == 1


def _put_files(store, n: int) -> None:
    for k in range(n):
        write_instance(store, STUDY, SERIES, f"{SERIES}.{k}", b"x")


@pytest.mark.parametrize(
    ("status", "instances", "unfinished"),
    [
        (None, 0, True),  # stored, never got a JSON (killed before the first write)
        ("receiving", 3, True),
        ("queued", 3, True),
        ("analysing", 3, True),  # died mid-analysis: run again
        ("done", 3, False),
        ("failed", 3, False),
        ("done", 2, True),  # a new instance landed after the analysis
    ],
)
def test_find_unfinished(tmp_path: Path, status, instances, unfinished) -> None:
    store = open_store(tmp_path)
    _put_files(store, 3)
    if status is not None:
        write_result(store, _record(store, status, instances=instances))
    found, _ = find_unfinished(store)
    assert bool(found) == unfinished
    if found:
        assert len(found[0].files) == 3


def test_find_unfinished_removes_half_written_files(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    _put_files(store, 1)
    tmp = store.series_dir(STUDY, SERIES) / f".{SERIES}.9.dcm.abc.tmp"
    tmp.write_bytes(b"half")
    found, problems = find_unfinished(store)
    assert not tmp.exists()
    assert any("half-written" in p for p in problems)
    assert [p.name for p in found[0].files] == [f"{SERIES}.0.dcm"]


def test_corrupt_json_is_reported_and_the_series_analysed_again(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    _put_files(store, 1)
    store.result_path(STUDY, SERIES).parent.mkdir(parents=True)
    store.result_path(STUDY, SERIES).write_text("{not json")
    found, problems = find_unfinished(store)
    assert found and found[0].record is None
    assert any("corrupt result JSON" in p for p in problems)
    with pytest.raises(StoreError, match="corrupt"):
        result_for(store, STUDY, SERIES)
    assert json.loads(json.dumps(problems))  # plain strings, one line each
