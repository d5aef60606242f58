"""Series completeness and the status moves of a result, on a clock the test turns by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from ichscan.receive.result import InstanceInfo
from ichscan.receive.store import Unfinished, open_store, read_result, write_instance
from ichscan.receive.tracker import SeriesTracker

pytestmark = pytest.mark.timeout(30)

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _info(k: int) -> InstanceInfo:
    return InstanceInfo(STUDY, SERIES, f"{SERIES}.{k}", "1.2.840.10008.5.1.4.1.1.2", "P7")


@pytest.fixture
def setup(tmp_path: Path):
    store = open_store(tmp_path)
    clock = Clock()
    completed: list[tuple[str, str]] = []
    tracker = SeriesTracker(
        store,
        timeout_s=10,
        on_complete=completed.append,
        labels=["any"],
        model={"architecture": "resnet18", "labels": "rsna"},
        clock=clock,
    )
    return store, clock, completed, tracker


def _arrive(store, tracker, k: int, calling: str = "CT1") -> None:
    is_new = write_instance(store, STUDY, SERIES, f"{SERIES}.{k}", b"x")
    tracker.instance_stored(_info(k), calling, is_new)


def _status(store) -> dict:
    record = read_result(store.result_path(STUDY, SERIES))
    assert record is not None
    return record


def test_first_instance_writes_receiving_at_once(setup) -> None:
    store, _, completed, tracker = setup
    _arrive(store, tracker, 0)
    record = _status(store)
    assert record["status"] == "receiving" and record["instances"] == 1
    assert record["patient_id"] == "P7" and record["calling_ae"] == "CT1"
    assert record["instances_dir"] == f"incoming/{STUDY}/{SERIES}"
    assert completed == []


def test_quiet_for_the_timeout_queues_the_series(setup) -> None:
    store, clock, completed, tracker = setup
    for k in range(3):
        _arrive(store, tracker, k)
        clock.now += 6  # never 10 s quiet while instances keep coming
        assert tracker.poll() == []
    clock.now += 4
    assert tracker.poll() == [(STUDY, SERIES)]
    assert completed == [(STUDY, SERIES)]
    assert _status(store)["status"] == "queued" and _status(store)["instances"] == 3
    assert tracker.poll() == [], "queued once"


def test_analysis_commits_and_the_series_is_forgotten(setup) -> None:
    store, clock, _, tracker = setup
    _arrive(store, tracker, 0)
    clock.now += 10
    tracker.poll()
    _, epoch = tracker.begin((STUDY, SERIES))
    assert _status(store)["status"] == "analysing"
    final = tracker.finish((STUDY, SERIES), epoch, {"status": "done", "suspected_ich": True})
    assert final is not None and _status(store)["status"] == "done"
    assert tracker.counts() == {}


def test_instance_during_analysis_discards_it(setup) -> None:
    store, clock, completed, tracker = setup
    _arrive(store, tracker, 0)
    clock.now += 10
    tracker.poll()
    _, epoch = tracker.begin((STUDY, SERIES))
    _arrive(store, tracker, 1)
    assert tracker.finish((STUDY, SERIES), epoch, {"status": "done"}) is None
    assert _status(store)["status"] == "receiving"
    clock.now += 10
    tracker.poll()
    assert completed == [(STUDY, SERIES)] * 2
    assert _status(store)["instances"] == 2


def test_instance_while_queued_sends_it_back_to_receiving(setup) -> None:
    store, clock, _, tracker = setup
    _arrive(store, tracker, 0)
    clock.now += 10
    tracker.poll()
    _arrive(store, tracker, 1)
    assert _status(store)["status"] == "receiving"
    assert tracker.begin((STUDY, SERIES)) is None, "the stale queue entry is skipped"


def _finish(store, clock, tracker, **fields) -> None:
    clock.now += 10
    tracker.poll()
    _, epoch = tracker.begin((STUDY, SERIES))
    tracker.finish((STUDY, SERIES), epoch, {"status": "done", **fields})


def test_resent_instance_of_a_done_series_changes_nothing(setup) -> None:
    store, clock, _, tracker = setup
    _arrive(store, tracker, 0)
    _finish(store, clock, tracker)
    _arrive(store, tracker, 0)  # the same SOP instance again
    assert _status(store)["status"] == "done"
    assert tracker.counts() == {}


def test_new_instance_reopens_a_done_series_keeping_its_findings(setup) -> None:
    store, clock, _, tracker = setup
    _arrive(store, tracker, 0)
    _finish(store, clock, tracker, suspected_ich=True)
    _arrive(store, tracker, 1)
    record = _status(store)
    assert record["status"] == "receiving" and record["generation"] == 2
    assert record["instances"] == 2
    assert record["suspected_ich"] is True, "a suspected bleed stays on the worklist"


def test_recover_leaves_a_series_without_a_readable_header_alone(setup) -> None:
    store, clock, completed, tracker = setup
    _arrive(store, tracker, 0)  # makes a real JSON we then pretend a crash left "analysing"
    record = {**_status(store), "status": "analysing"}
    tracker2 = SeriesTracker(
        store,
        timeout_s=10,
        on_complete=completed.append,
        labels=["any"],
        model={},
        clock=clock,
    )
    files = sorted(store.series_dir(STUDY, SERIES).glob("*.dcm"))
    # A header is needed to rebuild a record; these files are not DICOM.
    assert tracker2.recover([Unfinished(STUDY, SERIES, files, record, "was analysing")]) == 0


def test_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        SeriesTracker(
            open_store(tmp_path), timeout_s=0, on_complete=print, labels=["any"], model={}
        )


def test_a_failed_write_changes_nothing_and_is_retried(setup, monkeypatch) -> None:
    from ichscan.receive import tracker as tracker_module

    store, clock, completed, tracker = setup
    _arrive(store, tracker, 0)
    clock.now += 10
    real = tracker_module.write_result

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker_module, "write_result", full_disk)
    assert tracker.poll() == []  # logged, not raised: other series still move
    assert tracker.counts() == {"receiving": 1} and completed == []
    monkeypatch.setattr(tracker_module, "write_result", real)
    assert tracker.poll() == [(STUDY, SERIES)]
    assert _status(store)["status"] == "queued"


KEY = (STUDY, SERIES)


def test_an_aborted_association_marks_its_series_and_restarts_the_quiet_timer(setup) -> None:
    """R-1: the series an aborted association delivered to is marked (the worker then
    reports it PARTIAL), waits a full quiet period from the abort, and an analysis under
    way when the abort is heard is discarded."""
    store, clock, _, tracker = setup
    started = clock()
    for k in range(3):
        _arrive(store, tracker, k)
    clock.now += 10
    tracker.poll()
    begun = tracker.begin(KEY)
    assert begun is not None
    tracker.association_ended({KEY: 3}, released=False, calling_ae="CT1", started=started)
    record = _status(store)
    assert record["status"] == "receiving"
    assert record["association_aborted"]["instances"] == 3
    assert record["association_aborted"]["calling_ae"] == "CT1"
    assert tracker.finish(KEY, begun[1], {"status": "done"}) is None, "analysis discarded"
    clock.now += 9
    assert tracker.poll() == [], "the quiet period starts again at the abort"
    clock.now += 1
    assert tracker.poll() == [KEY]
    record, _ = tracker.begin(KEY)
    assert record["association_aborted"]["instances"] == 3  # what the worker reads


def test_a_released_retry_clears_the_abort_mark(setup) -> None:
    store, clock, _, tracker = setup
    first = clock()
    _arrive(store, tracker, 0)
    clock.now += 1
    tracker.association_ended({KEY: 1}, released=False, calling_ae="CT1", started=first)
    # An association that was open before the abort proves nothing when it ends.
    tracker.association_ended({KEY: 1}, released=True, calling_ae="CT1", started=first)
    assert _status(store)["association_aborted"] is not None
    retry = clock.now = clock.now + 1
    for k in range(3):
        _arrive(store, tracker, k)
    tracker.association_ended({KEY: 3}, released=True, calling_ae="CT1", started=retry)
    assert _status(store)["association_aborted"] is None
    clock.now += 10
    assert tracker.poll() == [KEY]
    record, _ = tracker.begin(KEY)
    assert record["association_aborted"] is None and record["instances"] == 3


def test_an_abort_after_the_series_was_analysed_leaves_it_alone(setup) -> None:
    store, clock, _, tracker = setup
    start = clock()
    _arrive(store, tracker, 0)
    _finish(store, clock, tracker)
    tracker.association_ended({KEY: 1}, released=False, calling_ae="CT1", started=start)
    assert _status(store)["status"] == "done" and _status(store)["association_aborted"] is None
