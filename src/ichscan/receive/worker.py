"""The analysis queue: complete series in, results out, one series per worker thread at a
time (one worker by default; the model is loaded once and shared).

For each series: the tracker marks it analysing, the model runs, the SR is written, the
tracker commits done|failed in the result JSON (the commit point), then one line goes to
``state/analysed.log`` and the SR to the forwarder. A process killed before the commit
leaves the series "analysing", which the next start analyses again; killed between the
commit and the log line, the next start adds the missing line (store.reconcile_log).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from ichscan.errors import IchscanError
from ichscan.infer.predictor import Predictor
from ichscan.receive.analyse import analyse_series
from ichscan.receive.forward import Forwarder
from ichscan.receive.result import aborted_warning, finished_fields, now_utc
from ichscan.receive.store import Store, append_analysed
from ichscan.receive.tracker import SeriesKey, SeriesTracker

log = logging.getLogger("ichscan.receive")

RETRIES = 3
RETRY_PAUSE_S = 2.0


class AnalysisWorker:
    def __init__(
        self,
        store: Store,
        tracker: SeriesTracker,
        predictor: Predictor,
        jobs: queue.Queue[SeriesKey | None],
        *,
        workers: int = 1,
        algorithm: str = "ichscan",
        forwarder: Forwarder | None = None,
    ) -> None:
        if workers < 1:
            raise IchscanError(None, f"--workers must be at least 1, not {workers}")
        self.store = store
        self.tracker = tracker
        self.predictor = predictor
        self.jobs = jobs
        self.algorithm = algorithm
        self.forwarder = forwarder
        self.finished = 0
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"ichscan-analysis-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Finish the analyses in progress; queued series stay queued on disk for the next
        start."""
        self._stopping.set()
        for _ in self._threads:
            self.jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        failures: dict[SeriesKey, int] = {}
        while (key := self.jobs.get()) is not None:
            if self._stopping.is_set():
                continue
            try:
                self.process(key)
                failures.pop(key, None)
            except Exception as exc:  # the store cannot be written (disk full...)
                failures[key] = failures.get(key, 0) + 1
                if failures[key] < RETRIES:
                    log.error("series %s: %s; trying again shortly", key[1], exc)
                    self._stopping.wait(RETRY_PAUSE_S)
                    self.jobs.put(key)
                else:
                    log.error(
                        "series %s: %s; left as it is on disk, picked up at the next start",
                        key[1],
                        exc,
                    )
                    failures.pop(key)

    def process(self, key: SeriesKey) -> dict[str, Any] | None:
        """Analyse one queued series; its committed record, or None when it was not
        queued any more or changed during the analysis."""
        started = self.tracker.begin(key)
        if started is None:
            return None
        record, epoch = started
        t0 = time.perf_counter()
        mark = record.get("association_aborted")
        try:
            fields = analyse_series(
                self.store,
                *key,
                self.predictor,
                algorithm=self.algorithm,
                partial=aborted_warning(mark) if mark else None,
            )
            status = "done"
        except IchscanError as exc:
            fields, status = {"error": str(exc)}, "failed"
        except Exception as exc:
            log.exception("analysis of series %s", key[1])
            fields, status = {"error": f"internal error: {type(exc).__name__}: {exc}"}, "failed"
        final = self.tracker.finish(
            key, epoch, finished_fields(record, status, now_utc(), **fields)
        )
        if final is None:
            log.info(
                "series %s: new instances arrived during the analysis; it will be analysed "
                "again once complete",
                key[1],
            )
            return None
        append_analysed(self.store, final)
        self.finished += 1
        log.info("%s", result_line(final, time.perf_counter() - t0))
        if self.forwarder is not None and final.get("sr"):
            self.forwarder.submit(self.store.root / final["sr"])
        return final


def result_line(record: dict[str, Any], seconds: float) -> str:
    """The one log line of a finished series."""
    head = f"series {record['series_instance_uid']} (patient {record['patient_id'] or '-'})"
    if record["status"] == "failed":
        return f"{head}: FAILED after {seconds:.1f}s: {record['error']}"
    label = record["labels"][0]
    p = record["findings"][label]["probability"]
    verdict = "SUSPECTED ICH" if record["suspected_ich"] else "no ICH suspected"
    positives = [k for k, v in record["findings"].items() if v["positive"] and k != label]
    more = f" ({', '.join(positives)})" if positives else ""
    key = record.get("key_slice") or {}
    no_sr = "" if record.get("sr") else "; no SR (see the result's warnings)"
    if record.get("completion") == "PARTIAL":
        no_sr += "; PARTIAL: the association was aborted, the series may be incomplete"
    return (
        f"{head}: {verdict}{more}, {label}={p:.3f}, key slice {key.get('index')}; "
        f"{record['slices']} slices analysed in {seconds:.1f}s, "
        f"{record['time_to_result_s']:.1f}s after the last instance{no_sr}"
    )
