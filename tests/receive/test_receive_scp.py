"""The receiver end to end on loopback, in-process: a pynetdicom SCU pushes synthetic
series; the instances on disk, the result JSON (what the worklist is built from), the SR,
concurrency, a dropped association, bad input, the allow list, forwarding and recovery."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    CTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
)

from ichscan.io.dicom_write import write_dataset_without_pixels
from ichscan.models.bundle import trained_on
from ichscan.receive.analyse import TYPE2_COPIED
from ichscan.receive.service import ListenConfig, Receiver
from ichscan.receive.sr import sr_summary
from ichscan.receive.store import open_store, read_analysed, result_for, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from receive_helpers import (
    analysed_lines,
    associate,
    legacy_enhanced,
    send,
    stored_sops,
    uids,
    wait_for_result,
    write_series,
)

# The tiny model trained once per session (tests/infer/infer_fixtures.py).
pytest_plugins = ["infer_fixtures"]
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_threaded_torch")]

TIMEOUT_S = 0.4


@pytest.fixture(scope="session")
def predictor(trained_bundle: Path):
    from infer_fixtures import one_thread

    from ichscan.infer.predictor import Predictor

    with one_thread():
        return Predictor(trained_bundle, "cpu")


@pytest.fixture
def make_receiver(tmp_path: Path, predictor, trained_bundle: Path):
    started: list[Receiver] = []

    def make(store: Path | None = None, **kw) -> Receiver:
        config = ListenConfig(
            model=trained_bundle,
            store=store or tmp_path / "store",
            host="127.0.0.1",
            port=0,
            series_timeout_s=TIMEOUT_S,
            grace_s=2,
            **kw,
        )
        rx = Receiver(config, predictor=predictor)
        rx.start()
        started.append(rx)
        return rx

    yield make
    for rx in started:
        if rx._server is not None:
            rx.stop()


@pytest.fixture
def receiver(make_receiver) -> Receiver:
    return make_receiver()


def test_study_is_stored_analysed_and_reported(receiver: Receiver, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "in", patient_id="PAT42")
    study, series, _ = uids(paths[0])
    sent = {uids(p)[2] for p in paths}
    assert send(receiver.port, paths, calling="CT_SCANNER") == [0] * len(paths)

    record = wait_for_result(receiver.store, study, series)
    # Every instance is on disk under its SOPInstanceUID, byte-identical in its pixels.
    assert stored_sops(receiver.store, study, series) == sent
    for p in paths:
        stored = receiver.store.series_dir(study, series) / f"{uids(p)[2]}.dcm"
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(p).PixelData

    # The worklist entry: what result_for reads is the shared JSON contract.
    assert result_for(receiver.store.root, study, series) == record
    labels = record["labels"]
    assert record["status"] == "done" and record["error"] is None
    assert record["patient_id"] == "PAT42" and record["calling_ae"] == "CT_SCANNER"
    assert record["instances"] == len(paths) and record["slices"] == len(paths)
    assert set(record["findings"]) == set(labels)
    for finding in record["findings"].values():
        assert 0 <= finding["probability"] <= 1
        assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert record["suspected_ich"] == record["findings"][labels[0]]["positive"]
    assert record["arrived_at"] <= record["last_instance_at"] <= record["finished_at"]
    assert 0 <= record["time_to_result_s"] < 30
    assert record["key_slice"]["sop_instance_uid"] in sent
    assert 0 <= record["key_slice"]["index"] < len(paths)
    assert record["instances_dir"] == f"incoming/{study}/{series}"
    assert record["model"] == {
        "architecture": "resnet18",
        "labels": "rsna",
        "trained_on": trained_on(receiver.predictor.bundle.config),
    }
    assert record["completion"] == "COMPLETE" and record["association_aborted"] is None

    # The SR: the same study and patient, one finding per label, the key slice referenced.
    sr = pydicom.dcmread(receiver.store.root / record["sr"])
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.StudyInstanceUID == study and sr.PatientID == "PAT42"
    assert sr.SeriesInstanceUID != series
    summary = sr_summary(sr)
    assert len(summary) == len(labels)
    headline = summary["SCT:1386000"]  # "any": Intracranial hemorrhage
    assert headline["probability"] == pytest.approx(
        record["findings"][labels[0]]["probability"], abs=1e-4
    )
    assert headline["positive"] == record["suspected_ich"]
    assert headline["key_sop_instance_uid"] == record["key_slice"]["sop_instance_uid"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert {str(i.ReferencedSOPInstanceUID) for i in evidence.ReferencedSOPSequence} == sent

    assert len(analysed_lines(receiver.store, series)) == 1

    # The web app's worklist (another package) reads the same files without a complaint.
    worklist = pytest.importorskip("ichscan.serve.worklist").read_worklist(receiver.store.root)
    assert worklist["problems"] == []
    [entry] = worklist["studies"]
    assert entry["patient_id"] == "PAT42" and entry["suspected_ich"] == record["suspected_ich"]
    folder, _ = pytest.importorskip("ichscan.serve.worklist").series_folder(
        receiver.store.root, study, series
    )
    assert folder == receiver.store.series_dir(study, series)


def test_multiframe_enhanced_ct_is_received_and_analysed(
    receiver: Receiver, tmp_path: Path
) -> None:
    legacy = legacy_enhanced(write_series(tmp_path / "in", n_slices=6))
    assoc = associate(receiver.port, contexts=[LegacyConvertedEnhancedCTImageStorage])
    assert assoc.send_c_store(legacy).Status == 0
    assoc.release()
    record = wait_for_result(
        receiver.store, str(legacy.StudyInstanceUID), str(legacy.SeriesInstanceUID)
    )
    assert record["instances"] == 1 and record["slices"] == 6
    assert record["key_slice"]["sop_instance_uid"] == legacy.SOPInstanceUID
    assert 1 <= record["key_slice"]["frame"] <= 6


def test_compressed_transfer_syntaxes_are_received_and_decoded(
    receiver: Receiver, tmp_path: Path
) -> None:
    """One small series per syntax a scanner or PACS commonly sends; each one analysed."""
    series = {
        name: write_series(tmp_path / name, n_slices=3, compression=name)
        for name in ("implicit", "deflate", "rle", "jpegls", "jpeg2000", "jpeg-lossless")
    }
    syntaxes = {str(pydicom.dcmread(p[0]).file_meta.TransferSyntaxUID) for p in series.values()}
    ae = AE("TESTSCU")
    for syntax in syntaxes:  # one context per syntax, so each is offered on its own
        ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ICHSCAN")
    assert len(assoc.accepted_contexts) == len(syntaxes)
    for paths in series.values():
        assert [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths] == [0, 0, 0]
    assoc.release()
    for name, paths in series.items():
        study, uid, _ = uids(paths[0])
        record = wait_for_result(receiver.store, study, uid)
        assert record["slices"] == 3, name
        stored = receiver.store.series_dir(study, uid) / f"{uids(paths[0])[2]}.dcm"
        sent_syntax = pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == sent_syntax, name


def test_echo(receiver: Receiver) -> None:
    assoc = associate(receiver.port, contexts=["1.2.840.10008.1.1"])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_four_associations_at_once_lose_and_duplicate_nothing(
    receiver: Receiver, tmp_path: Path
) -> None:
    """Four senders at once: two whole series, and a third series split across two
    associations that also resend each other's instances."""
    study = generate_uid()
    a = write_series(tmp_path / "a", study_uid=study, seed=1)
    b = write_series(tmp_path / "b", study_uid=study, seed=2)
    c = write_series(tmp_path / "c", study_uid=study, seed=3, n_slices=12)
    batches = [a, b, c[:8], c[4:]]  # c[4:8] travels twice, at the same time
    statuses: list[list[int]] = [[] for _ in batches]

    def push(i: int) -> None:
        statuses[i] = send(receiver.port, batches[i], calling=f"SCU{i}")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(s == [0] * len(batch) for s, batch in zip(statuses, batches, strict=True))

    for paths in (a, b, c):
        _, series, _ = uids(paths[0])
        record = wait_for_result(receiver.store, study, series)
        folder = receiver.store.series_dir(study, series)
        assert stored_sops(receiver.store, study, series) == {uids(p)[2] for p in paths}
        assert len(list(folder.iterdir())) == len(paths), "no duplicate, no temporary file"
        assert record["instances"] == len(paths) == record["slices"]
        assert len(analysed_lines(receiver.store, series)) == 1


def test_two_workers_analyse_each_series_once(make_receiver, tmp_path: Path) -> None:
    rx = make_receiver(workers=2)
    study = generate_uid()
    series = [
        write_series(tmp_path / f"s{i}", study_uid=study, seed=i, n_slices=4) for i in range(3)
    ]
    for paths in series:
        send(rx.port, paths)
    for paths in series:
        record = wait_for_result(rx.store, study, uids(paths[0])[1])
        assert record["instances"] == 4
    assert len(read_analysed(rx.store)) == 3


def test_dropped_association_keeps_what_was_acknowledged(
    receiver: Receiver, tmp_path: Path
) -> None:
    paths = write_series(tmp_path / "in")
    study, series, _ = uids(paths[0])
    assoc = associate(receiver.port)
    acked = {uids(p)[2] for p in paths[:4] if assoc.send_c_store(pydicom.dcmread(p)).Status == 0}
    assoc.abort()  # the sender drops the association mid-series
    assert len(acked) == 4
    record = wait_for_result(receiver.store, study, series)
    assert stored_sops(receiver.store, study, series) == acked
    assert record["instances"] == 4


def _association_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("association ")]


def _wait_for_line(caplog, text: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in _association_lines(caplog) if text in line]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}: {_association_lines(caplog)}")


def test_a_peer_abort_is_logged_as_aborted_and_a_release_as_released(
    receiver: Receiver, tmp_path: Path, caplog
) -> None:
    """R-2: pynetdicom signals a peer's A-ABORT only after the connection's close, so the
    one line of the association used to say "closed"."""
    caplog.set_level(logging.INFO, logger="ichscan.receive")
    paths = write_series(tmp_path / "in")
    assoc = associate(receiver.port, calling="ABORTER")
    assert all(assoc.send_c_store(pydicom.dcmread(p)).Status == 0 for p in paths[:3])
    assoc.abort()
    line = _wait_for_line(caplog, "ABORTER@")
    assert " aborted: 3 instance(s) stored, 0 refused" in line, line
    send(receiver.port, paths[3:5], calling="RELEASER")
    line = _wait_for_line(caplog, "RELEASER@")
    assert " released: 2 instance(s) stored, 0 refused" in line, line
    assert not any(" closed: " in line for line in _association_lines(caplog))


def test_a_series_cut_short_by_an_aborted_association_is_reported_partial(
    receiver: Receiver, tmp_path: Path
) -> None:
    """R-1: 4 of 10 instances, then the sender aborts: the series is analysed once quiet,
    but as PARTIAL (warning in the JSON, CompletionFlag PARTIAL in the SR, partial on the
    worklist); the sender's full retry makes it COMPLETE."""
    from highdicom.sr import srread

    paths = write_series(tmp_path / "in")
    study, series, _ = uids(paths[0])
    assoc = associate(receiver.port, calling="CT_ABORTS")
    assert all(assoc.send_c_store(pydicom.dcmread(p)).Status == 0 for p in paths[:4])
    assoc.abort()
    record = wait_for_result(receiver.store, study, series)
    warning = "association from CT_ABORTS aborted after 4 instances; result may be incomplete"
    assert record["instances"] == 4
    assert record["completion"] == "PARTIAL" and record["warnings"][0] == warning
    assert record["association_aborted"]["instances"] == 4
    from ichscan.receive.sr import sr_text

    sr_path = receiver.store.root / record["sr"]
    sr = srread(sr_path)  # highdicom reads it back: still a valid Comprehensive SR
    assert sr.CompletionFlag == "PARTIAL" and sr.VerificationFlag == "UNVERIFIED"
    assert warning in sr_text(sr, "121106")
    assert "PARTIAL" in sr.SeriesDescription
    assert str(sr.CompletionFlagDescription) == warning[:64]
    worklist = pytest.importorskip("ichscan.serve.worklist").read_worklist(receiver.store.root)
    [study_entry] = worklist["studies"]
    assert study_entry["partial"] is True

    # The sender retries the whole series on an association it releases.
    assert send(receiver.port, paths, calling="CT_ABORTS") == [0] * len(paths)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = result_for(receiver.store.root, study, series)
        if record["status"] == "done" and record["generation"] == 2:
            break
        time.sleep(0.05)
    record = wait_for_result(receiver.store, study, series)
    assert record["generation"] == 2 and record["instances"] == len(paths)
    assert record["completion"] == "COMPLETE" and record["association_aborted"] is None
    assert warning not in record["warnings"]
    sr = srread(receiver.store.root / record["sr"])
    assert sr.CompletionFlag == "COMPLETE"
    worklist = pytest.importorskip("ichscan.serve.worklist").read_worklist(receiver.store.root)
    assert worklist["studies"][0]["partial"] is False


def test_result_sr_and_start_up_say_what_the_model_was_trained_on(
    make_receiver, tmp_path: Path, caplog
) -> None:
    """R-3: the result JSON, the SR (a TEXT item, and the Series Description when the model
    rests on synthetic phantoms) and the start-up line, in predict's words."""
    from highdicom.sr import srread

    from ichscan.receive.sr import sr_text

    caplog.set_level(logging.INFO, logger="ichscan.receive")
    rx = make_receiver()
    words = trained_on(rx.predictor.bundle.config)
    assert words.startswith("SYNTHETIC phantoms at ")
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listening")]
    assert f"trained on {words})" in start[0]
    assert any(
        "SYNTHETIC phantoms: its findings on real CT" in r.getMessage() for r in caplog.records
    )
    paths = write_series(tmp_path / "in")
    study, series, _ = uids(paths[0])
    assert send(rx.port, paths) == [0] * len(paths)
    record = wait_for_result(rx.store, study, series)
    assert record["model"]["trained_on"] == words
    sr = srread(rx.store.root / record["sr"])
    assert sr_text(sr, "TRAINED_ON") == [words]
    assert sr.SeriesDescription == "ichscan ICH triage (SYNTHETIC-trained model)"
    assert sr.CompletionFlag == "COMPLETE" and "CompletionFlagDescription" not in sr
    assert len(sr_summary(sr)) == len(record["labels"])  # the findings read back as before


def test_non_ct_sop_class_is_not_negotiated(receiver: Receiver) -> None:
    assoc = associate(receiver.port, contexts=[MRImageStorage, CTImageStorage])
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert MRImageStorage not in accepted and CTImageStorage in accepted
    mr = pydicom.Dataset()
    mr.SOPClassUID, mr.SOPInstanceUID = MRImageStorage, generate_uid()
    mr.file_meta = pydicom.dataset.FileMetaDataset()
    mr.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with pytest.raises(ValueError, match="presentation context"):
        assoc.send_c_store(mr)
    assoc.release()


def test_ct_label_on_a_non_ct_dataset_fails(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mr = pydicom.dcmread(write_series(tmp_path / "mr", modality="MR")[0])
    no_pixels = pydicom.dcmread(write_dataset_without_pixels(tmp_path / "np.dcm", modality="CT"))
    assoc = associate(receiver.port)
    with caplog.at_level(logging.WARNING, logger="ichscan.receive"):
        assert assoc.send_c_store(mr).Status == 0xA900
        assert assoc.send_c_store(no_pixels).Status == 0xA900
    assoc.release()
    assert "modality is MR, not CT" in caplog.text
    assert "no pixel data" in caplog.text
    assert not list(receiver.store.incoming.rglob("*.dcm"))


def test_corrupt_dataset_fails_and_stores_nothing(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    good = write_series(tmp_path / "in", n_slices=2)[0]
    raw = good.read_bytes()
    meta_end = raw.index(b"\x08\x00\x05\x00")  # first dataset element after the file meta
    bad = {
        # Valid file meta, then an element whose length runs far past the end of the data.
        "overlong": raw[:meta_end] + b"\x08\x00\x05\x00CS\xff\x7fISO_IR 100" + b"\x00" * 20,
        "garbage": raw[:meta_end] + np.random.default_rng(0).bytes(4000),
        "truncated": raw[: len(raw) - 2000],
    }
    for name, data in bad.items():
        (tmp_path / f"{name}.dcm").write_bytes(data)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as-is
    assoc = associate(receiver.port)
    with caplog.at_level(logging.WARNING, logger="ichscan.receive"):
        for name in bad:
            assert assoc.send_c_store(str(tmp_path / f"{name}.dcm")).Status == 0xC000, name
    assoc.release()
    assert caplog.text.count("refused") == 3
    assert "corrupt dataset" in caplog.text and "truncated pixel data" in caplog.text
    assert not list(receiver.store.incoming.rglob("*.dcm"))
    assert not list(receiver.store.incoming.rglob(".*")), "no temporary file either"


def test_full_disk_refuses_the_instance_with_out_of_resources(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    from ichscan.receive import scp

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scp, "write_instance", full_disk)
    paths = write_series(tmp_path / "in", n_slices=1)
    with caplog.at_level(logging.ERROR, logger="ichscan.receive"):
        assert send(receiver.port, paths) == [0xA700]
    assert "No space left on device" in caplog.text


def test_wrong_ae_title_is_rejected(
    make_receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rx = make_receiver(allow=["GOOD_CT"])
    with caplog.at_level(logging.WARNING, logger="ichscan.receive"):
        bad = associate(rx.port, calling="STRANGER")
        time.sleep(0.2)  # the log line is written in the association's own thread
    assert bad.is_rejected
    assert "STRANGER@127.0.0.1" in caplog.text and "not in the allow list" in caplog.text
    good = associate(rx.port, calling="GOOD_CT")
    assert good.is_established
    good.release()


def test_resend_does_not_reanalyse_and_new_instance_reopens(
    receiver: Receiver, tmp_path: Path
) -> None:
    paths = write_series(tmp_path / "in", n_slices=10)
    study, series, _ = uids(paths[0])
    send(receiver.port, paths[:9])
    first = wait_for_result(receiver.store, study, series)
    send(receiver.port, paths[:2])  # a PACS resends what it already sent
    time.sleep(3 * TIMEOUT_S)  # long enough for a (wrong) re-analysis to be queued
    assert receiver.wait_idle(5)
    assert result_for(receiver.store, study, series)["finished_at"] == first["finished_at"]
    send(receiver.port, paths[9:])  # the late last slice: acknowledged once re-opened
    second = wait_for_result(receiver.store, study, series)
    assert second["status"] == "done" and second["generation"] == 2
    assert second["instances"] == 10
    rows = [r for r in read_analysed(receiver.store) if r["series_instance_uid"] == series]
    assert [r["generation"] for r in rows] == ["1", "2"]


def test_sr_is_forwarded_to_the_destination(make_receiver, tmp_path: Path) -> None:
    received: list[pydicom.Dataset] = []

    def on_store(event) -> int:
        received.append(event.dataset)
        return 0

    pacs = AE("PACS")
    pacs.add_supported_context(ComprehensiveSRStorage)
    server = pacs.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        rx = make_receiver(forward=f"PACS@127.0.0.1:{server.server_address[1]}")
        paths = write_series(tmp_path / "in")
        study, series, _ = uids(paths[0])
        send(rx.port, paths)
        record = wait_for_result(rx.store, study, series)
        rx.stop()  # waits for the forwarder
        assert rx.forwarder is not None and rx.forwarder.sent == 1
        assert len(received) == 1 and received[0].StudyInstanceUID == study
        assert record["sr"]
    finally:
        server.shutdown()


def test_forward_to_nobody_is_one_log_line(
    make_receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rx = make_receiver(forward="PACS@127.0.0.1:9")  # nothing listens on the discard port
    rx.forwarder.retries, rx.forwarder.backoff_s = 2, 0.01
    paths = write_series(tmp_path / "in", n_slices=3)
    study, series, _ = uids(paths[0])
    with caplog.at_level(logging.ERROR, logger="ichscan.receive"):
        send(rx.port, paths)
        wait_for_result(rx.store, study, series)
        rx.stop()
    assert rx.forwarder.failed == 1
    [line] = [r.getMessage() for r in caplog.records if "could not forward" in r.getMessage()]
    assert "after 2 tries (cannot connect (Connection refused))" in line


def test_pynetdicom_lines_about_forwarding_are_dropped_ours_kept() -> None:
    from ichscan.receive.forward import FORWARD_THREAD, QuietForwarding

    def record(logger: str, thread: str) -> logging.LogRecord:
        r = logging.LogRecord(logger, logging.ERROR, __file__, 1, "x", None, None)
        r.threadName = thread
        return r

    quiet = QuietForwarding()
    assert not quiet.filter(record("pynetdicom.transport", "RequestorThread@2026"))
    assert not quiet.filter(record("pynetdicom.assoc", FORWARD_THREAD))
    assert quiet.filter(record("pynetdicom.assoc", "AcceptorThread@2026"))
    assert quiet.filter(record("ichscan.receive", FORWARD_THREAD))


def test_one_store_one_receiver(make_receiver, tmp_path: Path) -> None:
    from ichscan.receive.store import StoreError

    make_receiver(store=tmp_path / "store")
    with pytest.raises(StoreError, match="another ichscan listen is using this store"):
        make_receiver(store=tmp_path / "store")


def test_restart_picks_up_stored_but_unanalysed_series(make_receiver, tmp_path: Path) -> None:
    """A receiver stopped with series still receiving (the JSON says so) analyses them on
    its next start, once each."""
    store = tmp_path / "store"
    rx = make_receiver(store=store)
    rx.tracker.timeout_s = 3600  # nothing completes before the stop
    paths = write_series(tmp_path / "in")
    study, series, _ = uids(paths[0])
    send(rx.port, paths)
    rx.stop()
    assert result_for(store, study, series)["status"] == "receiving"

    rx2 = make_receiver(store=store)
    assert rx2.recovered == 1
    record = wait_for_result(rx2.store, study, series)
    assert record["instances"] == len(paths) and record["generation"] == 1
    assert len(analysed_lines(rx2.store, series)) == 1


def test_series_left_analysing_by_a_crash_is_analysed_again_once(
    make_receiver, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    rx = make_receiver(store=store_dir)
    rx.tracker.timeout_s = 3600
    paths = write_series(tmp_path / "in", n_slices=4)
    study, series, _ = uids(paths[0])
    send(rx.port, paths)
    rx.stop()
    # What a process killed mid-analysis leaves behind.
    store = open_store(store_dir)
    write_result(store, {**result_for(store, study, series), "status": "analysing"})

    rx2 = make_receiver(store=store_dir)
    assert rx2.recovered == 1
    record = wait_for_result(rx2.store, study, series)
    assert record["generation"] == 1 and record["instances"] == 4
    assert len(analysed_lines(rx2.store, series)) == 1


def test_result_committed_but_not_logged_is_logged_not_reanalysed(
    make_receiver, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    rx = make_receiver(store=store_dir)
    paths = write_series(tmp_path / "in", n_slices=4)
    study, series, _ = uids(paths[0])
    send(rx.port, paths)
    done = wait_for_result(rx.store, study, series)
    rx.stop()
    rx.store.analysed_log.unlink()  # killed between the JSON commit and the log line

    rx2 = make_receiver(store=store_dir)
    assert rx2.recovered == 0
    assert len(analysed_lines(rx2.store, series)) == 1
    assert result_for(store_dir, study, series)["finished_at"] == done["finished_at"]


# Type 2 patient and study attributes: present in DICOM, maybe empty; RSNA's files and many
# anonymisers drop them altogether.
# As in the RSNA files: every Type 2 attribute the SR copies is gone but PatientID.
TYPE2 = [name for name in TYPE2_COPIED if name != "PatientID"]


def test_series_without_type2_patient_attributes_is_analysed_with_an_sr(
    receiver: Receiver, tmp_path: Path
) -> None:
    paths = write_series(tmp_path / "in", n_slices=4)
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword in TYPE2:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(p)
    study, series, _ = uids(paths[0])
    assert send(receiver.port, paths) == [0] * len(paths)
    record = wait_for_result(receiver.store, study, series)
    assert record["status"] == "done" and record["error"] is None, record
    sr = pydicom.dcmread(receiver.store.root / record["sr"])
    for keyword in TYPE2:
        assert keyword in sr and not sr[keyword].value, keyword  # present, empty
    assert sr.StudyInstanceUID == study


def test_empty_pixel_data_is_refused_with_one_line(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(write_series(tmp_path / "in", n_slices=1)[0])
    ds.PixelData = b""
    assoc = associate(receiver.port)
    with caplog.at_level(logging.DEBUG):
        # Damaged, as a cut-off instance is; never the generic 0xC211 of a handler that raised.
        assert assoc.send_c_store(ds).Status == 0xC000
    assoc.release()
    lines = [r.getMessage() for r in caplog.records if r.name == "ichscan.receive"]
    assert any(ds.SOPInstanceUID in line and "empty pixel data" in line for line in lines), lines
    assert "Traceback" not in caplog.text and "Exception in handler" not in caplog.text
    assert not list(receiver.store.incoming.rglob("*.dcm"))


def test_any_exception_of_the_check_is_a_refusal_naming_the_instance(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    from ichscan.receive import scp

    def nested_too_deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(scp, "_check_pixel_length", nested_too_deep)
    ds = pydicom.dcmread(write_series(tmp_path / "in", n_slices=1)[0])
    assoc = associate(receiver.port)
    with caplog.at_level(logging.WARNING):
        assert assoc.send_c_store(ds).Status == 0xC000
    assoc.release()
    [line] = [
        r.getMessage()
        for r in caplog.records
        if r.name == "ichscan.receive" and r.levelno >= logging.WARNING
    ]
    assert ds.SOPInstanceUID in line and "RecursionError: maximum recursion depth" in line
    assert "\n" not in line and "Exception in handler" not in caplog.text
    assert not list(receiver.store.incoming.rglob("*.dcm"))


def test_pixel_length_check_reads_an_empty_element_as_empty(tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    from ichscan.receive.scp import CANNOT_UNDERSTAND, Refused, _check_pixel_length

    ds = pydicom.dcmread(write_series(tmp_path / "in", n_slices=1)[0])
    ds.PixelData = None  # how pydicom reads a zero-length element
    with pytest.raises(Refused, match=r"empty pixel data \(0 of 8192 bytes\)") as refused:
        _check_pixel_length(ds, ExplicitVRLittleEndian, "instance 1.2.3")
    assert refused.value.status == CANNOT_UNDERSTAND
