"""Series completeness: DICOM has no "end of series" message, so a series counts as complete
when no new instance has arrived for ``timeout_s`` seconds; then it is handed to the worker.

The tracker owns the result JSON of every series it is following and is the only writer of
its status until the series is finished, so each status change happens under one lock:

- an instance arrives: receiving (a queued series goes back to receiving; an analysing one
  stays analysing and its analysis is discarded when it ends, see ``finish``);
- quiet for ``timeout_s``: queued, and ``on_complete(key)`` is called;
- the worker takes it: analysing (``begin``); the worker ends it: done | failed (``finish``).

Each arrival bumps the series' epoch. An analysis started at epoch e whose series has moved
on when it ends is thrown away and the series waits for quiet again: a series is never
reported on a subset of what was acknowledged for it.

An association that ends without a release (the sender's A-ABORT, or a dropped connection)
may have cut its series short. Each series it delivered to that is still followed is marked
(``association_aborted`` in the JSON), counts as just arrived (its quiet timer starts again,
an analysis under way is discarded) and, when analysed with the mark still on, is reported
PARTIAL, with a warning. The mark goes when an association that started after the abort
delivers to the series and ends with a release (the sender's retry went through).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydicom

from ichscan.receive.result import (
    InstanceInfo,
    aborted_warning,
    iso,
    new_record,
    now_utc,
    reopen,
)
from ichscan.receive.store import (
    FINISHED,
    Store,
    StoreError,
    Unfinished,
    instance_files,
    read_result,
    write_result,
)

log = logging.getLogger("ichscan.receive")

SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


@dataclass
class _Series:
    record: dict[str, Any]
    last_arrival: float  # monotonic clock
    epoch: int = 0
    dirty: bool = False
    last_flush: float = 0.0
    aborted_at: float | None = None  # when an association cut it short (None: not here)


class SeriesTracker:
    """See the module notes. ``flush_s``: how often a receiving series' JSON is rewritten
    with its running instance count (the first instance and every status change are written
    at once; counting every instance durably would double the fsyncs per instance)."""

    def __init__(
        self,
        store: Store,
        *,
        timeout_s: float,
        on_complete: Callable[[SeriesKey], None],
        labels: list[str],
        model: dict[str, str],
        flush_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"--series-timeout must be positive, not {timeout_s}")
        self.store = store
        self.timeout_s = float(timeout_s)
        self.on_complete = on_complete
        self.labels = list(labels)
        self.model = dict(model)
        self.flush_s = flush_s
        self.clock = clock
        self._series: dict[SeriesKey, _Series] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        tick = min(0.2, self.timeout_s / 5)
        self._thread = threading.Thread(
            target=self._run, args=(tick,), name="ichscan-series-timer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:  # leave every running count on disk
            for st in self._series.values():
                if st.dirty:
                    with contextlib.suppress(OSError):
                        self._commit(st, st.record)

    def _run(self, tick: float) -> None:
        while not self._stop.wait(tick):
            try:
                self.poll()
            except Exception:  # a full disk must not kill the timer: retry next tick
                log.exception("series timer")

    # -- arrivals ----------------------------------------------------------------------

    def instance_stored(self, info: InstanceInfo, calling_ae: str, is_new: bool) -> None:
        """Called after an instance is durably stored and before it is acknowledged. Raises
        when the result JSON cannot be written (the instance is then refused)."""
        key = (info.study_uid, info.series_uid)
        with self._lock:
            st = self._series.get(key)
            if st is not None:
                record = dict(st.record)
            else:
                record = self._existing(key)
                if record is None:
                    record = new_record(
                        info,
                        store=self.store,
                        calling_ae=calling_ae,
                        labels=self.labels,
                        model=self.model,
                        arrived=now_utc(),
                    )
                    log.info(
                        "series %s (study %s, patient %s) from %s: receiving",
                        info.series_uid,
                        info.study_uid,
                        info.patient_id or "-",
                        calling_ae,
                    )
                elif record["status"] in FINISHED:
                    if not is_new:
                        return  # a resent instance of an analysed series changes nothing
                    was = record["status"]
                    record = reopen(record)
                    log.info(
                        "series %s was %s; a new instance re-opens it (generation %d)",
                        info.series_uid,
                        was,
                        record["generation"],
                    )
                record["status"] = "receiving"
            if is_new:
                record["instances"] = int(record.get("instances") or 0) + 1
            record["last_instance_at"] = iso(now_utc())
            # A new series and a status change are on disk before the instance is
            # acknowledged; a running count can wait for the next flush.
            write_now = st is None or record["status"] == "queued"
            record["status"] = "receiving" if record["status"] == "queued" else record["status"]
            if write_now:
                write_result(self.store, record)
            if st is None:
                st = self._series[key] = _Series(record, self.clock(), last_flush=self.clock())
            else:
                st.record = record
                st.dirty = st.dirty or not write_now
            st.last_arrival = self.clock()
            st.epoch += 1

    def association_ended(
        self,
        series: dict[SeriesKey, int],
        *,
        released: bool,
        calling_ae: str,
        started: float,
    ) -> None:
        """An association that stored ``series[key]`` instances of each series has ended;
        ``started``: when it was accepted (this tracker's clock). See the module notes."""
        with self._lock:
            now = self.clock()
            for key, n in series.items():
                st = self._series.get(key)
                if st is None:
                    continue  # analysed already, after a full quiet period: left as it is
                try:
                    if not released:
                        self._mark_aborted(key, st, n, calling_ae, now)
                    elif st.record.get("association_aborted") and (
                        st.aborted_at is None or started > st.aborted_at
                    ):
                        self._unmark_aborted(key, st, calling_ae)
                except OSError as exc:
                    log.error("series %s: cannot write its result (%s)", key[1], exc)

    def _mark_aborted(
        self, key: SeriesKey, st: _Series, n: int, calling_ae: str, now: float
    ) -> None:
        mark = {"calling_ae": calling_ae, "instances": n, "at": iso(now_utc())}
        record = {**st.record, "association_aborted": mark}
        if record["status"] in ("queued", "analysing"):
            record["status"] = "receiving"  # an analysis under way is discarded (epoch)
        self._commit(st, record)
        st.last_arrival = now
        st.aborted_at = now
        st.epoch += 1
        log.warning(
            "series %s: %s; analysed once quiet for %gs, as PARTIAL unless a transfer from "
            "the sender completes it",
            key[1],
            aborted_warning(mark),
            self.timeout_s,
        )

    def _unmark_aborted(self, key: SeriesKey, st: _Series, calling_ae: str) -> None:
        record = {**st.record, "association_aborted": None}
        if record["status"] in ("queued", "analysing"):
            record["status"] = "receiving"  # analysed as PARTIAL otherwise: again, whole
            st.epoch += 1
            st.last_arrival = self.clock()
        self._commit(st, record)
        st.aborted_at = None
        log.info(
            "series %s: a later association from %s was released; no longer partial",
            key[1],
            calling_ae or "-",
        )

    def _existing(self, key: SeriesKey) -> dict[str, Any] | None:
        try:
            return read_result(self.store.result_path(*key))
        except StoreError as exc:
            log.warning("%s; starting a new result", exc)
            return None

    def recover(self, unfinished: list[Unfinished]) -> int:
        """Follow the series a previous process left unfinished, as if their last instance
        had just arrived: they are queued after the series timeout (a sender whose transfer
        was cut may be about to resume it). Returns how many were taken up."""
        taken = 0
        for item in unfinished:
            info = _first_readable(item)
            if info is None:
                log.warning(
                    "%s: none of its %d instance(s) has a readable header; left alone",
                    self.store.series_dir(item.study_uid, item.series_uid),
                    len(item.files),
                )
                continue
            record = item.record
            if record is None:
                times = [p.stat().st_mtime for p in item.files]
                record = new_record(
                    info,
                    store=self.store,
                    calling_ae="",
                    labels=self.labels,
                    model=self.model,
                    arrived=datetime.fromtimestamp(min(times), UTC),
                )
                record["last_instance_at"] = iso(datetime.fromtimestamp(max(times), UTC))
            elif record.get("status") in FINISHED:
                record = reopen(record)
            record = {**record, "status": "receiving", "instances": len(item.files)}
            key = (item.study_uid, item.series_uid)
            with self._lock:
                write_result(self.store, record)
                self._series[key] = _Series(record, self.clock(), last_flush=self.clock())
            log.info(
                "recovered series %s (study %s): %s, %d instance(s) on disk",
                item.series_uid,
                item.study_uid,
                item.reason,
                len(item.files),
            )
            taken += 1
        return taken

    # -- completeness ------------------------------------------------------------------

    def poll(self) -> list[SeriesKey]:
        """Queue every series that has been quiet for the timeout; flush running counts."""
        ready: list[SeriesKey] = []
        with self._lock:
            now = self.clock()
            for key, st in self._series.items():
                try:
                    if (
                        st.record["status"] == "receiving"
                        and now - st.last_arrival >= self.timeout_s
                    ):
                        # The folder is the truth: two associations racing on one resent
                        # instance may both have counted it.
                        n = len(instance_files(self.store.series_dir(*key)))
                        self._commit(st, {**st.record, "instances": n, "status": "queued"})
                        ready.append(key)
                    elif st.dirty and now - st.last_flush >= self.flush_s:
                        self._commit(st, st.record)
                except OSError as exc:  # a full disk: this series waits, the others go on
                    log.error("series %s: cannot write its result (%s)", key[1], exc)
        for key in ready:
            log.info("series %s complete (%gs quiet): queued", key[1], self.timeout_s)
            self.on_complete(key)
        return ready

    # -- the worker's side -------------------------------------------------------------

    def begin(self, key: SeriesKey) -> tuple[dict[str, Any], int] | None:
        """Mark a queued series analysing; None when it is no longer queued (new instances
        arrived after it was queued, or it was taken already: it will be queued again)."""
        with self._lock:
            st = self._series.get(key)
            if st is None or st.record["status"] != "queued":
                return None
            self._commit(st, {**st.record, "status": "analysing"})
            return dict(st.record), st.epoch

    def finish(self, key: SeriesKey, epoch: int, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Commit an analysis (its fields include the final status) and stop following the
        series; None when instances arrived during the analysis (discarded, series back to
        receiving, to be analysed again once quiet). When the result cannot be written the
        series is queued again in memory and the error raised: the caller retries."""
        with self._lock:
            st = self._series[key]
            try:
                if st.epoch != epoch:
                    self._commit(st, {**st.record, "status": "receiving"})
                    return None
                self._commit(st, {**st.record, **fields})
            except OSError:
                st.record = {**st.record, "status": "queued"}
                raise
            del self._series[key]
            return dict(st.record)

    # -- state -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for st in self._series.values():
                out[st.record["status"]] = out.get(st.record["status"], 0) + 1
            return out

    def _commit(self, st: _Series, record: dict[str, Any]) -> None:
        """The record on disk first, then in memory: a failed write changes nothing."""
        write_result(self.store, record)
        st.record = record
        st.dirty = False
        st.last_flush = self.clock()


def _first_readable(item: Unfinished) -> InstanceInfo | None:
    for path in item.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        info = InstanceInfo.from_dataset(ds)
        if info.study_uid == item.study_uid and info.series_uid == item.series_uid:
            return info
    return None
