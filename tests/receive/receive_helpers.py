"""Helpers shared by the receiver tests: synthetic series on disk, a pynetdicom SCU that
records what it got success for, and waiting for a result JSON."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ichscan.data.phantom import make_head_phantom
from ichscan.io.dicom_write import write_ct_series
from ichscan.receive.store import Store

SHAPE = (10, 64, 64)


def write_series(
    out: Path,
    *,
    n_slices: int = SHAPE[0],
    seed: int = 1,
    study_uid: str | None = None,
    patient_id: str = "RX0001",
    **kwargs: Any,
) -> list[Path]:
    """One synthetic head CT series (64x64, 5 mm) in spatial order."""
    hu, _ = make_head_phantom((n_slices, *SHAPE[1:]), (5.0, 3.6, 3.6), seed=seed)
    return write_ct_series(
        hu,
        out,
        study_uid=study_uid or generate_uid(),
        patient_id=patient_id,
        pixel_spacing=(3.6, 3.6),
        **kwargs,
    )


def legacy_enhanced(paths: list[Path]) -> pydicom.Dataset:
    """The series as one Legacy Converted Enhanced CT object (multi-frame), by highdicom."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    return LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )


def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def scu(calling: str = "TESTSCU", contexts: Iterable[str] = (CTImageStorage,)) -> AE:
    ae = AE(ae_title=calling)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def associate(port: int, calling: str = "TESTSCU", called: str = "ICHSCAN", **kw: Any):
    assoc = scu(calling, **kw).associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        # A test SCU should not wait out delayed ACKs either (see scp.on_accepted).
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def send(port: int, paths: Iterable[Path], calling: str = "TESTSCU") -> list[int]:
    """C-STORE each file on one association; the statuses."""
    assoc = associate(port, calling)
    assert assoc.is_established, "association not established"
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def wait_for_status(
    store: Store, study: str, series: str, status: str = "done", timeout_s: float = 60.0
) -> dict[str, Any]:
    path = store.result_path(study, series)
    deadline = time.monotonic() + timeout_s
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if path.exists():
            record = json.loads(path.read_text())
            if record["status"] == status:
                return record
        time.sleep(0.05)
    raise AssertionError(f"series {series} not {status} after {timeout_s}s: {record}")


def wait_for_result(
    store: Store, study: str, series: str, status: str = "done", timeout_s: float = 60.0
) -> dict[str, Any]:
    """The finished result, once its analysis log line is written too (the log is appended
    just after the JSON commit)."""
    record = wait_for_status(store, study, series, status, timeout_s)
    deadline = time.monotonic() + 5
    generation = str(record.get("generation", 1))
    while time.monotonic() < deadline:
        if any(line.split("\t")[3] == generation for line in analysed_lines(store, series)):
            return record
        time.sleep(0.02)
    raise AssertionError(f"no analysis log line for series {series} generation {generation}")


def stored_sops(store: Store, study: str, series: str) -> set[str]:
    folder = store.series_dir(study, series)
    return {p.stem for p in folder.glob("*.dcm")}


def analysed_lines(store: Store, series: str) -> list[str]:
    if not store.analysed_log.exists():
        return []
    return [line for line in store.analysed_log.read_text().splitlines() if series in line]
