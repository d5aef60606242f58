"""`ichscan listen`: the receiver put together (store, tracker, worker, forwarder, SCP), its
start-up recovery and its graceful stop."""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from ichscan.errors import IchscanError
from ichscan.infer.predictor import Predictor
from ichscan.models.bundle import is_synthetic_line
from ichscan.receive.analyse import model_info
from ichscan.receive.forward import Destination, Forwarder, QuietForwarding
from ichscan.receive.scp import StorageHandlers, make_ae
from ichscan.receive.store import (
    Store,
    find_unfinished,
    lock_store,
    open_store,
    reconcile_log,
)
from ichscan.receive.tracker import SeriesKey, SeriesTracker
from ichscan.receive.worker import AnalysisWorker

log = logging.getLogger("ichscan.receive")


@dataclass
class ListenConfig:
    model: str | Path
    store: str | Path
    ae_title: str = "ICHSCAN"
    host: str = "0.0.0.0"
    port: int = 11112
    series_timeout_s: float = 10.0
    workers: int = 1
    allow: list[str] = field(default_factory=list)
    forward: str | None = None
    device: str = "auto"
    grace_s: float = 10.0

    def check(self) -> None:
        title = self.ae_title.strip()
        if not 0 < len(title) <= 16 or "\\" in title:
            raise IchscanError(None, f"--ae-title {self.ae_title!r}: 1 to 16 characters, no '\\'")
        if not 0 <= self.port < 65536:
            raise IchscanError(None, f"--port {self.port}: not a TCP port")
        if self.series_timeout_s <= 0:
            raise IchscanError(
                None, f"--series-timeout must be positive, not {self.series_timeout_s}"
            )
        if self.workers < 1:
            raise IchscanError(None, f"--workers must be at least 1, not {self.workers}")
        for aet in self.allow:
            if not 0 < len(aet.strip()) <= 16:
                raise IchscanError(None, f"--allow-ae {aet!r}: AE titles are 1 to 16 characters")


class Receiver:
    """A running receiver. ``predictor`` may be passed in (loaded once by the caller, as the
    tests do); otherwise the model folder is loaded at start."""

    def __init__(self, config: ListenConfig, predictor: Predictor | None = None) -> None:
        config.check()
        self.config = config
        self.destination = Destination.parse(config.forward) if config.forward else None
        self.predictor = predictor
        self.store: Store | None = None
        self.port: int | None = None
        self.recovered = 0
        self._server: Any = None
        self._ae: Any = None

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cfg = self.config
        if self.predictor is None:
            self.predictor = Predictor(cfg.model, cfg.device)
        warm_up(self.predictor)
        store = self.store = open_store(cfg.store)
        self._lock = lock_store(store)
        model = model_info(self.predictor)
        jobs: queue.Queue[SeriesKey | None] = queue.Queue()
        self.tracker = SeriesTracker(
            store,
            timeout_s=cfg.series_timeout_s,
            on_complete=jobs.put,
            labels=list(self.predictor.labels),
            model=model,
        )
        self.forwarder = (
            Forwarder(self.destination, cfg.ae_title.strip()) if self.destination else None
        )
        self.worker = AnalysisWorker(
            store,
            self.tracker,
            self.predictor,
            jobs,
            workers=cfg.workers,
            algorithm=f"ichscan {model['architecture']} ({model['labels']})",
            forwarder=self.forwarder,
        )
        self.jobs = jobs
        # Recovery before the port opens: nothing new can race with what is picked up.
        added = reconcile_log(store)
        if added:
            log.info("analysis log: added %d line(s) for results committed before a crash", added)
        unfinished, problems = find_unfinished(store)
        for line in problems:
            log.warning("%s", line)
        self.recovered = self.tracker.recover(unfinished)
        self.tracker.start()
        self.worker.start()
        if self.forwarder is not None:
            self.forwarder.start()
        self._ae = make_ae(cfg.ae_title.strip(), cfg.allow)
        handlers = StorageHandlers(store, self.tracker)
        try:
            self._server = self._ae.start_server(
                (cfg.host, cfg.port), block=False, evt_handlers=handlers.events()
            )
        except OSError as exc:
            self._stop_services()
            raise IchscanError(
                None, f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})"
            ) from None
        self.port = int(self._server.server_address[1])
        log.info(
            "listening as %s on %s:%d; store %s; model %s (%s, %s; trained on %s); "
            "series timeout %gs; %d worker(s)%s%s; %d unfinished series picked up",
            cfg.ae_title.strip(),
            cfg.host,
            self.port,
            store.root,
            cfg.model,
            model["architecture"],
            model["labels"],
            model["trained_on"],
            cfg.series_timeout_s,
            cfg.workers,
            f"; allow {','.join(cfg.allow)}" if cfg.allow else "",
            f"; forward to {self.destination}" if self.destination else "",
            self.recovered,
        )
        if is_synthetic_line(model["trained_on"]):
            log.warning(
                "the model was trained on SYNTHETIC phantoms: its findings on real CT mean "
                "nothing (every result JSON and SR says so)"
            )

    def stop(self) -> None:
        """Stop accepting, let open associations finish (up to grace_s, then abort them:
        what they had acknowledged is on disk already), finish running analyses."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            deadline = time.monotonic() + self.config.grace_s
            while self._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self._ae.active_associations:
                assoc.abort()
        self._stop_services()
        log.info("stopped")

    def _stop_services(self) -> None:
        self.tracker.stop()
        self.worker.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        self._lock.close()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every series followed has a final result (tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.tracker.counts():
                return True
            time.sleep(0.02)
        return False


def warm_up(predictor: Predictor) -> None:
    """One forward pass on a blank slice at start-up, so that the first series does not pay
    the framework's lazy initialisation."""
    size = predictor.spec.size
    try:
        predictor.predict_inputs(np.zeros((1, 3, size, size), dtype=np.uint8))
    except Exception as exc:  # the model may want more than a blank slice; say so, go on
        log.warning("model warm-up skipped (%s: %s)", type(exc).__name__, exc)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom narrates every PDU at INFO; its warnings still show.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietForwarding())
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def run_listen(config: ListenConfig) -> int:
    """Run until SIGINT or SIGTERM; 0 after a clean stop."""
    setup_logging()
    receiver = Receiver(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        receiver.start()
        while not stop.wait(0.5):
            pass
        receiver.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
