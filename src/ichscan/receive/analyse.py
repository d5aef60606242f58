"""One complete series through the model: its findings, key slices and Structured Report.

The series folder is read like any DICOM folder (``ichscan.load``), so the receiver sees
exactly what ``ichscan predict`` would on the same files; multi-frame (enhanced) CT goes
through :mod:`ichscan.receive.enhanced`, one slice per frame. The key slice of a label is the
analysed slice with that label's highest probability. When the bundle reslices a thin series
into thicker slabs, a slab is no instance of the series: it is mapped back to the source
instance nearest its centre along the slice normal, which is the instance the SR references
and the JSON names.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ichscan.infer.predictor import Predictor
from ichscan.io.load import load_discovered
from ichscan.io.series import discover
from ichscan.models.bundle import trained_on
from ichscan.receive.enhanced import load_multiframe
from ichscan.receive.result import findings
from ichscan.receive.sr import LabelResult, build_sr
from ichscan.receive.store import Store, instance_files, make_dirs, write_atomic
from ichscan.scan import Scan

log = logging.getLogger("ichscan.receive")

MAX_WARNINGS = 20
_UID_TAGS = ["SOPClassUID", "SOPInstanceUID"]
# Type 2 attributes of the Patient and General Study modules, which the SR copies from its
# evidence and must carry, empty when unknown. Many sources leave them out altogether (the
# RSNA files, anonymised exports): missing there means empty here, as DICOM has it.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def model_info(predictor: Predictor) -> dict[str, str]:
    """The model as every result JSON names it, with what it was trained on (``predict``'s
    words: synthetic phantoms are called so)."""
    config = predictor.bundle.config
    return {
        "architecture": str(config.get("architecture", "")),
        "labels": str(config.get("label_set", "")),
        "trained_on": trained_on(config),
    }


def source_slice(scan: Scan, analysed: Scan, index: int) -> int:
    """The index in ``scan`` (spatial order) of the instance behind ``analysed``'s slice
    ``index``: itself when nothing was resliced, else the instance nearest the slab centre."""
    if analysed is scan:
        return index
    normal = scan.slice_normal
    origin = scan.affine[:3, 3] @ normal
    positions = scan.metadata.get("slice_positions_mm")
    if positions is not None and len(positions) == scan.n_slices:
        depths = origin + np.asarray(positions, dtype=np.float64)
    else:
        depths = origin + np.arange(scan.n_slices) * float(scan.affine[:3, 0] @ normal)
    centre = (analysed.affine[:3, 3] + index * analysed.affine[:3, 0]) @ normal
    return int(np.argmin(np.abs(depths - centre)))


@dataclass(frozen=True)
class SliceRef:
    """The instance (and frame, for a multi-frame one) behind one slice of the scan."""

    path: str
    frame: int | None
    sop_class: str
    sop_uid: str


def _read_series(folder: Path, series_uid: str) -> tuple[Scan, list[SliceRef]]:
    """The series as a Scan, and for each of its slices the instance behind it."""
    files = instance_files(folder)
    multiframe = [p for p in files if _frame_count(p) > 1]
    if multiframe:
        scan = load_multiframe(multiframe, source=str(folder))
        if len(multiframe) < len(files):
            scan.warnings.append(
                f"{len(files) - len(multiframe)} single-frame instance(s) beside the "
                "multi-frame ones were left out"
            )
        uids = {}
        for path in dict.fromkeys(path for path, _ in scan.metadata["frames"]):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
            uids[path] = (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        return scan, [SliceRef(p, n, *uids[p]) for p, n in scan.metadata["frames"]]
    found = discover(folder)
    # One decoding process: this runs beside the network threads, where forking a pool is
    # not safe, and a native-syntax series is not decoded by the pool anyway.
    scan = load_discovered(found, series_uid=series_uid, workers=1)
    [series] = [s for s in found.series if s.series_uid == series_uid]
    return scan, [SliceRef(h.path, None, h.sop_class, h.sop_uid) for h in series.headers]


def _frame_count(path: Path) -> int:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
        return int(ds.get("NumberOfFrames") or 1)
    except Exception:
        return 1  # the series reader reports what it cannot read


def _evidence(refs: list[SliceRef], study_uid: str, series_uid: str) -> list[Dataset]:
    """The series' instances as SR evidence: the first one's full header (patient and study
    are copied from it), the others by their identifiers (all the SR lists of them), which
    spares reading every header a second time."""
    first = pydicom.dcmread(refs[0].path, stop_before_pixels=True)
    for keyword in TYPE2_COPIED:
        if keyword not in first:
            setattr(first, keyword, "")
    items = [first]
    for sop_class, sop_uid in dict.fromkeys((r.sop_class, r.sop_uid) for r in refs):
        if sop_uid == first.SOPInstanceUID:
            continue
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        items.append(ds)
    return items


def analyse_series(
    store: Store,
    study_uid: str,
    series_uid: str,
    predictor: Predictor,
    *,
    algorithm: str,
    partial: str | None = None,
) -> dict[str, Any]:
    """Predict one stored series and write its SR; the result fields for its JSON. Raises
    IchscanError for a series the model cannot read (the worker records it as failed). An SR
    that cannot be built leaves ``sr`` None and says why in ``warnings``. ``partial``: why
    the series may be incomplete (its association was aborted): the first warning, and
    ``completion`` PARTIAL in the JSON and the SR."""
    folder = store.series_dir(study_uid, series_uid)
    n_files = len(instance_files(folder))
    scan, refs = _read_series(folder, series_uid)
    analysed, x = predictor.prepare(scan)
    slice_probs, scan_probs, _ = predictor.predict_inputs(x)
    labels = list(predictor.labels)
    thresholds = [float(t) for t in predictor.scan_thresholds]  # scan-level decisions

    results = []
    for i, label in enumerate(labels):
        ref = refs[source_slice(scan, analysed, int(np.argmax(slice_probs[:, i])))]
        results.append(
            LabelResult(
                label=label,
                probability=float(scan_probs[i]),
                threshold=thresholds[i],
                key_sop_class=ref.sop_class,
                key_sop_uid=ref.sop_uid,
                key_frame=ref.frame,
            )
        )
    headline = int(np.argmax(slice_probs[:, 0]))
    key = source_slice(scan, analysed, headline)
    warnings = ([partial] if partial else []) + list(scan.warnings[:MAX_WARNINGS])
    sr_file: str | None = None
    try:
        encoded = _encoded_sr(
            refs,
            study_uid,
            series_uid,
            results,
            algorithm,
            trained=trained_on(predictor.bundle.config),
            partial=partial,
        )
    except Exception as exc:
        # The findings stand without their SR: losing them to a header the SR cannot take
        # would hide a suspected bleed from the worklist.
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line in the log
        note = f"no Structured Report: cannot build it ({reason}); the findings are here only"
        log.warning("series %s: %s", series_uid, note)
        warnings.append(note)
    else:
        sr_path = store.sr_path(study_uid, series_uid)
        make_dirs(sr_path.parent)
        write_atomic(sr_path, encoded)
        sr_file = store.relative(sr_path)
    found = findings(labels, [float(p) for p in scan_probs], thresholds)
    key_slice: dict[str, Any] = {
        "index": key,
        "sop_instance_uid": refs[key].sop_uid,
        "probability": round(float(slice_probs[headline, 0]), 6),
    }
    if refs[key].frame is not None:
        key_slice["frame"] = refs[key].frame
    return {
        "instances": n_files,
        "slices": int(analysed.n_slices),
        "findings": found,
        "suspected_ich": found[labels[0]]["positive"],
        "key_slice": key_slice,
        "sr": sr_file,
        "error": None,
        "warnings": warnings,
        "completion": "COMPLETE" if partial is None else "PARTIAL",
    }


def _encoded_sr(
    refs: list[SliceRef],
    study_uid: str,
    series_uid: str,
    results: list[LabelResult],
    algorithm: str,
    *,
    trained: str | None = None,
    partial: str | None = None,
) -> bytes:
    """The series' SR as a DICOM file's bytes."""
    sr = build_sr(
        _evidence(refs, study_uid, series_uid),
        results,
        algorithm=algorithm,
        trained_on=trained,
        partial=partial,
    )
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
