"""Send each finished Structured Report on to a destination AE (C-STORE SCU), with retries,
in a thread of its own so that a slow or absent PACS never holds up the analyses."""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from ichscan.errors import IchscanError

log = logging.getLogger("ichscan.receive")

_TARGET = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _TARGET.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise IchscanError(
                None, f"--forward {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104"
            )
        return cls(match["aet"].strip(), match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_file(path: Path, dest: Destination, calling_ae: str, timeout_s: float = 30.0) -> int:
    """C-STORE one file; the DIMSE status (0 is success). Raises ConnectionError when no
    association can be made."""
    try:  # say why in words when nothing listens there (pynetdicom only says "failed")
        socket.create_connection((dest.host, dest.port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot connect ({exc.strerror or exc})") from None
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(
        ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        raise ConnectionError(
            "association rejected or aborted" if assoc.is_rejected else "no association"
        )
    try:
        status = assoc.send_c_store(str(path))
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


class QuietForwarding(logging.Filter):
    """Drops pynetdicom's own lines about the forwarder's associations: the forwarder logs
    one line per SR sent or given up, with the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        thread = record.threadName or ""
        return not (thread.startswith("RequestorThread@") or thread == FORWARD_THREAD)


FORWARD_THREAD = "ichscan-forward"


class Forwarder:
    """A queue of SR files and one thread that sends them, ``retries`` tries each with a
    doubling pause; every outcome is one log line."""

    def __init__(
        self, dest: Destination, calling_ae: str, *, retries: int = 3, backoff_s: float = 2.0
    ) -> None:
        self.dest = dest
        self.calling_ae = calling_ae
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=FORWARD_THREAD, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, path: Path) -> None:
        self._queue.put(path)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (path := self._queue.get()) is not None:
            self._send(path)

    def _send(self, path: Path) -> None:
        problem = ""
        for attempt in range(1, self.retries + 1):
            try:
                status = send_file(path, self.dest, self.calling_ae)
                if status == 0:
                    self.sent += 1
                    log.info("forwarded %s to %s", path.name, self.dest)
                    return
                problem = f"status 0x{status:04X}"
            except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
                problem = str(exc) or type(exc).__name__
            if attempt < self.retries and self._stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                break
        self.failed += 1
        log.error(
            "could not forward %s to %s after %d tries (%s); it stays in the store",
            path.name,
            self.dest,
            self.retries,
            problem,
        )
