"""The DICOM Storage SCP: which associations and instances are accepted, and the C-STORE
handler that makes each instance durable before it is acknowledged.

Accepted: CT Image Storage, Enhanced CT Image Storage and Legacy Converted Enhanced CT Image
Storage in Implicit/Explicit VR Little Endian, Deflated Explicit VR Little Endian, JPEG
Lossless SV1, JPEG-LS Lossless, JPEG 2000 Lossless and RLE Lossless; Verification (C-ECHO).
Any other SOP class is not negotiated (its presentation context is rejected), so a sender
cannot even offer it. With an allow list, an association from any other calling AE title is
rejected.

Per instance (in the association's thread): the encoded dataset is parsed in full and checked
(a single CT object with pixel data, UIDs that match the request and are safe as file names),
written to ``incoming/<study>/<series>/<sop>.dcm`` (temp, fsync, rename, fsync folder), the
tracker is told, and only then is Success returned. Anything else returns a failure status
and writes one log line; nothing is left under a final name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

from ichscan.errors import InputError, one_line
from ichscan.io.dicom import (
    NATIVE_SYNTAXES,
    check_ct_slice,
    header_from_dataset,
    needed_pixel_bytes,
    read_dataset,
)
from ichscan.receive.result import InstanceInfo
from ichscan.receive.store import Store, is_safe_uid, write_instance
from ichscan.receive.tracker import SeriesKey, SeriesTracker

log = logging.getLogger("ichscan.receive")

CT_STORAGE = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the store could not write the instance
NOT_MATCHING = 0xA900  # the dataset is not what its SOP class promises (not CT, no pixels)
CANNOT_UNDERSTAND = 0xC000  # the dataset does not parse


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_instance(data: bytes, sop_uid: str, sop_class: str) -> InstanceInfo:
    """Parse an encoded instance in full and check it is a CT image we can keep; the
    header's identifiers on success, Refused(status, reason) otherwise."""
    label = f"instance {sop_uid or '(no SOPInstanceUID)'}"
    try:
        ds = read_dataset(io.BytesIO(data), name=label)
        # pydicom parses lazily: walk every element now, so a corrupt one fails here and
        # not later in the analysis (quietly: the refusal is the one line that counts).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in ds.iterall():
                pass
    except InputError as exc:
        raise Refused(CANNOT_UNDERSTAND, exc.problem) from None
    except Exception as exc:
        raise Refused(CANNOT_UNDERSTAND, f"corrupt dataset ({exc})") from None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        # pydicom reads garbage leniently; a dataset without its own identity is garbage.
        raise Refused(CANNOT_UNDERSTAND, "corrupt dataset (no SOPClassUID/SOPInstanceUID)")
    # Damaged pixel data first: the CT checks would call a cut-off instance "not matching"
    # its SOP class, when it is one the sender should send again.
    meta = getattr(ds, "file_meta", None)
    _check_pixel_length(ds, str(meta.get("TransferSyntaxUID", "")) if meta else "", label)
    try:
        header = header_from_dataset(ds, label)
        check_ct_slice(header, label, multi_frame=True)
    except InputError as exc:
        raise Refused(NOT_MATCHING, exc.problem) from None
    except Exception as exc:
        raise Refused(CANNOT_UNDERSTAND, f"corrupt dataset ({exc})") from None
    info = InstanceInfo.from_dataset(ds)
    if info.sop_uid != sop_uid:
        raise Refused(NOT_MATCHING, f"SOPInstanceUID {info.sop_uid!r} differs from the request's")
    if info.sop_class != sop_class:
        raise Refused(NOT_MATCHING, f"SOPClassUID {info.sop_class} differs from the context's")
    for name, uid in (("Study", info.study_uid), ("Series", info.series_uid), ("SOP", sop_uid)):
        if not is_safe_uid(uid):
            raise Refused(NOT_MATCHING, f"{name}InstanceUID {uid!r} is missing or malformed")
    return info


def _check_pixel_length(ds: Dataset, syntax: str, label: str) -> None:
    if syntax not in NATIVE_SYNTAXES or "PixelData" not in ds:
        return  # compressed frames are checked when they are decoded for the analysis
    header = header_from_dataset(ds, label, geometry=False)
    if header.rows <= 0 or header.cols <= 0:
        return  # no usable Rows/Columns: the CT checks say so
    expected = needed_pixel_bytes(header)
    # An empty element reads as None, not as b"".
    size = len(ds.PixelData or b"")
    if size == 0:
        raise Refused(CANNOT_UNDERSTAND, f"empty pixel data (0 of {expected} bytes)")
    if size < expected:
        raise Refused(CANNOT_UNDERSTAND, f"truncated pixel data ({size} of {expected} bytes)")


@dataclass
class _AssocStats:
    peer: str
    calling: str = ""
    started: float = 0.0  # the tracker's clock
    stored: int = 0
    refused: int = 0
    # How it ended, from the last PDU the peer sent: "released" (A-RELEASE-RQ), "aborted"
    # (A-ABORT-RQ, or our own abort), "dropped" (the connection closed without either).
    ended: str = "dropped"
    series: dict[SeriesKey, int] = field(default_factory=dict)  # instances stored, per series


@dataclass
class StorageHandlers:
    """The event handlers of one receiver (state: the store, the tracker, per-association
    counts for the one log line each association gets)."""

    store: Store
    tracker: SeriesTracker
    _assocs: dict[int, _AssocStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_PDU_RECV, self.on_pdu),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    def on_store(self, event: Any) -> int:
        calling = _calling(event)
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.context.abstract_syntax)
        stats = self._stats(event)
        try:
            data = event.encoded_dataset(include_meta=True)
            info = check_instance(data, sop_uid, sop_class)
        except Refused as exc:
            stats.refused += 1
            log.warning(
                "refused %s from %s: %s (status 0x%04X)", sop_uid, calling, exc.reason, exc.status
            )
            return exc.status
        except Exception as exc:
            # A reader failure nobody foresaw is still this instance's fault: refuse it with
            # one line, as any other bad object, not with pynetdicom's handler traceback.
            stats.refused += 1
            log.warning(
                "refused %s from %s: unreadable dataset (%s) (status 0x%04X)",
                sop_uid,
                calling,
                one_line(f"{type(exc).__name__}: {exc}", limit=300),
                CANNOT_UNDERSTAND,
            )
            log.debug("the check of %s raised", sop_uid, exc_info=exc)
            return CANNOT_UNDERSTAND
        try:
            is_new = write_instance(self.store, info.study_uid, info.series_uid, sop_uid, data)
            self.tracker.instance_stored(info, calling, is_new)
        except OSError as exc:
            stats.refused += 1
            log.error("cannot store %s from %s: %s (status 0xA700)", sop_uid, calling, exc)
            return OUT_OF_RESOURCES
        except Exception:
            stats.refused += 1
            log.exception("cannot store %s from %s (status 0xA701)", sop_uid, calling)
            return OUT_OF_RESOURCES + 1
        stats.stored += 1
        key = (info.study_uid, info.series_uid)
        stats.series[key] = stats.series.get(key, 0) + 1
        return SUCCESS

    def on_echo(self, event: Any) -> int:
        log.info("C-ECHO from %s", _calling(event))
        return SUCCESS

    def on_accepted(self, event: Any) -> None:
        # Each C-STORE response is one small segment; without TCP_NODELAY it can wait out
        # the peer's delayed ACK (measured: ~26 -> ~14 ms per 512x512 instance on loopback).
        with contextlib.suppress(AttributeError, OSError):
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._assocs[id(event.assoc)] = _AssocStats(
                _peer(event), _calling(event), self.tracker.clock()
            )

    def on_rejected(self, event: Any) -> None:
        allowed = [a.strip() for a in event.assoc.ae.require_calling_aet]
        why = (
            "calling AE title not in the allow list"
            if allowed and _calling(event) not in allowed
            else f"more than {event.assoc.ae.maximum_associations} associations at once"
        )
        log.warning("association from %s rejected (%s)", _peer(event), why)

    def on_pdu(self, event: Any) -> None:
        """How the peer ends the association, from the PDU itself: it is read (on the DUL
        thread) before the connection closes, whereas pynetdicom signals a peer's A-ABORT
        (EVT_ABORTED) only after the close, and even a release may race with it."""
        pdu = event.pdu
        if isinstance(pdu, A_RELEASE_RQ | A_ABORT_RQ):
            with self._lock:
                stats = self._assocs.get(id(event.assoc))
                if stats is not None:
                    stats.ended = "released" if isinstance(pdu, A_RELEASE_RQ) else "aborted"

    def on_aborted(self, event: Any) -> None:
        # Our own abort (network timeout, stop): the connection closes after this.
        with self._lock:
            stats = self._assocs.get(id(event.assoc))
            if stats is not None and stats.ended == "dropped":
                stats.ended = "aborted"

    def on_closed(self, event: Any) -> None:
        with self._lock:
            stats = self._assocs.pop(id(event.assoc), None)
        if stats is None:
            return
        if stats.ended == "dropped" and getattr(event.assoc, "is_aborted", False):
            stats.ended = "aborted"
        log_at = log.info if stats.ended == "released" or not stats.stored else log.warning
        log_at(
            "association from %s %s: %d instance(s) stored, %d refused",
            stats.peer,
            stats.ended,
            stats.stored,
            stats.refused,
        )
        if stats.series:
            # Without a release, nothing says the sender had sent all it meant to.
            self.tracker.association_ended(
                stats.series,
                released=stats.ended == "released",
                calling_ae=stats.calling,
                started=stats.started,
            )

    def _stats(self, event: Any) -> _AssocStats:
        with self._lock:
            key = id(event.assoc)
            if key not in self._assocs:
                self._assocs[key] = _AssocStats(_peer(event))
            return self._assocs[key]


def _calling(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{str(requestor.ae_title).strip()}@{requestor.address}:{requestor.port}"


def make_ae(ae_title: str, allow: list[str] | None = None) -> AE:
    """The receiver's application entity: contexts, allow list, a few more associations
    than the default so several scanners can push at once."""
    ae = AE(ae_title=ae_title)
    for sop_class in CT_STORAGE:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if allow:
        ae.require_calling_aet = list(allow)
    ae.maximum_associations = 16
    return ae
