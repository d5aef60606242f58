"""The scan worker: a queue and a few threads that read each queued scan, run the model once
on it and write the result, so request handlers never wait on inference.

The model is loaded once, when the app is made. PyTorch releases the GIL inside its kernels,
so the event loop keeps answering (health, polling, slice images) while a worker thread
predicts. Grad-CAM heatmaps are made on demand, one slice at a time, by the request that
asks for an overlay, and cached on disk beside the scan.

The viewer shows the slices the model read: when the bundle reslices thin series to its
slice thickness, those slabs (``series.resliced_mm`` says so), so slice ``i`` of the images,
of the per-slice probabilities and of the heatmaps is always the same slice.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ichscan.errors import IchscanError
from ichscan.scan import Scan
from ichscan.serve.intake import Job, describe_discovery, one_line, public, rediscover, refusal
from ichscan.serve.scans import DONE, FAILED, PROCESSING, ScanStore, now_iso
from ichscan.serve.uploads import Limits

log = logging.getLogger("ichscan.serve")

VOLUME = "volume.npy"
MODEL_INPUT = "input.npy"
HU_WINDOWS = ["brain", "subdural", "bone", "soft"]


class StepFailed(Exception):
    """An exception no reader expected, with the step of the analysis it broke (the log
    says where; the sender learns what, about which file)."""

    def __init__(self, step: str, doing: str, cause: Exception) -> None:
        super().__init__(f"{step}: {type(cause).__name__}: {cause}")
        self.step = step
        self.doing = doing
        self.cause = cause


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class Processor:
    """Worker threads over a FIFO of scan ids. ``predictor`` None: scans are read and shown
    without a model (a worklist-only server)."""

    def __init__(
        self,
        store: ScanStore,
        predictor: Any | None,
        limits: Limits,
        *,
        workers: int = 1,
    ) -> None:
        self.store = store
        self.predictor = predictor
        self.limits = limits
        self.n_workers = max(1, workers)
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.threads: list[threading.Thread] = []
        # Grad-CAM explainer, made from the predictor on first use (tests may set another).
        self.explainer: Any | None = None
        self._cam_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        for scan_id in self.store.unfinished():
            self.store.update(scan_id, status="queued", started_at=None)
            self.queue.put(scan_id)
        for k in range(self.n_workers):
            thread = threading.Thread(target=self._run, name=f"ichscan-worker-{k}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout)
        self.threads.clear()

    def submit(self, scan_id: str, job: Job) -> None:
        self.jobs[scan_id] = job
        self.queue.put(scan_id)

    def queued(self) -> int:
        return self.queue.qsize()

    def _run(self) -> None:
        while True:
            scan_id = self.queue.get()
            if scan_id is None:
                return
            try:
                self.process(scan_id)
            except Exception as exc:  # a worker must outlive any one scan
                log.exception("scan %s: server error while processing it", scan_id)
                self._mark_failed(scan_id, exc)

    def _mark_failed(self, scan_id: str, exc: Exception) -> None:
        """A scan whose processing broke outside the analysis (its record could not be
        written...) is failed if it can be, so that no client waits on it for ever."""
        try:
            if self.store.exists(scan_id):
                error = f"server error while processing the scan ({type(exc).__name__})"
                self.store.update(scan_id, status=FAILED, finished_at=now_iso(), error=error)
        except Exception:
            log.exception("scan %s: cannot record the failure either", scan_id)

    # -- one scan ----------------------------------------------------------------------

    def process(self, scan_id: str) -> None:
        job = self.jobs.pop(scan_id, None)
        if not self.store.exists(scan_id):
            return  # deleted while it waited
        folder = self.store.folder(scan_id)
        job = job or Job.read(folder)
        record = self.store.update(scan_id, status=PROCESSING, started_at=now_iso())
        names = job.names
        start = time.perf_counter()
        try:
            result = self.analyse(folder, job)
        except Exception as exc:  # whatever broke, the sender gets one line naming the file
            error = self._failure(scan_id, str(record.get("name") or scan_id), exc, names)
            self.store.update(scan_id, status=FAILED, finished_at=now_iso(), error=error)
            return
        result["warnings"] = [public(w, names) for w in result["warnings"]]
        for other in result.get("other_series", []):
            other["selection_reason"] = public(other["selection_reason"], names)
        upload = record.get("upload") or {}
        if upload.get("kind") == "dicom" and (upload.get("n_files") or 0) > 1:
            # Many DICOM files: the patient and series say more than the first file's name.
            series = result["series"]
            parts = [series["patient_id"], series["description"] or series["series_uid"]]
            result["name"] = " · ".join(p for p in parts if p)
        if self.store.exists(scan_id):
            self.store.update(
                scan_id,
                status=DONE,
                finished_at=now_iso(),
                processing_s=round(time.perf_counter() - start, 3),
                **result,
            )

    @staticmethod
    def _failure(scan_id: str, shown: str, exc: Exception, names: dict[str, str]) -> str:
        """The error of a failed scan: a reader's refusal as it is; anything else as the
        file, the exception and its message, with the traceback logged."""
        if isinstance(exc, IchscanError):
            error = one_line(public(str(exc), names))
            log.info("scan %s: refused: %s", scan_id, error)
            return error
        step, doing, cause = "processing the scan", "read or analysed", exc
        if isinstance(exc, StepFailed):
            step, doing, cause = exc.step, exc.doing, exc.cause
        return refusal(shown, cause, names, step=step, doing=doing, scan_id=scan_id)

    def read_scan(self, job: Job) -> tuple[Scan, list[dict[str, Any]]]:
        from ichscan.io.image import read_image
        from ichscan.io.load import load_discovered
        from ichscan.io.nifti import read_nifti

        if job.kind == "nifti":
            return named_as_uploaded(read_nifti(job.path), job), []
        if job.kind == "image":
            window = self.predictor.image_window if self.predictor else "unknown"
            return named_as_uploaded(read_image(job.path, window=window), job), []
        found = rediscover(job, self.limits)
        return load_discovered(found), describe_discovery(found)

    def analyse(self, folder: Path, job: Job) -> dict[str, Any]:
        try:
            scan, others = self.read_scan(job)
        except IchscanError:
            raise
        except Exception as exc:
            raise StepFailed("reading the scan", "read", exc) from exc
        try:
            return self._predicted(folder, scan, others)
        except IchscanError:
            raise
        except Exception as exc:
            raise StepFailed("predicting", "analysed", exc) from exc

    def _predicted(self, folder: Path, scan: Scan, others: list[dict[str, Any]]) -> dict[str, Any]:
        shown = scan
        result: dict[str, Any] = {"labels": [], "findings": [], "slice_probabilities": []}
        if self.predictor is not None:
            shown, x = self.predictor.prepare(scan)
            slice_probs, scan_probs, _ = self.predictor.predict_inputs(x)
            save_array_atomic(folder / MODEL_INPUT, x)
            result = prediction_fields(self.predictor, slice_probs, scan_probs)
        save_array_atomic(folder / VOLUME, np.ascontiguousarray(shown.hu))
        resliced = shown is not scan
        result.update(
            series={
                "kind": str(scan.metadata.get("format") or "volume"),
                "series_uid": scan.series_uid,
                "study_uid": scan.study_uid,
                "patient_id": scan.patient_id,
                "description": str(scan.metadata.get("series_description") or ""),
                "modality": str(scan.metadata.get("modality") or ""),
                "n_slices": shown.n_slices,
                "rows": int(shown.hu.shape[1]),
                "cols": int(shown.hu.shape[2]),
                "spacing_mm": [round(float(s), 4) for s in shown.spacing],
                "slice_thickness_mm": scan.slice_thickness_mm,
                "source_slices": scan.n_slices,
                "resliced_mm": self.predictor.reslice_mm if resliced else None,
                "gantry_tilt_deg": scan.metadata.get("gantry_tilt_deg"),
                "selection_reason": str(scan.metadata.get("selection_reason") or ""),
            },
            other_series=others,
            slice_ids=list(shown.slice_ids),
            windowed=scan.windowed,
            windows_available=[scan.windowed] if scan.windowed else list(HU_WINDOWS),
            warnings=list(scan.warnings),
        )
        return result

    # -- heatmaps ----------------------------------------------------------------------

    def heatmap(self, folder: Path, k: int, label_index: int, windowed: str | None) -> np.ndarray:
        """float32 [rows, cols] in [0, 1]: the model's map of one label on slice ``k``
        (Grad-CAM, or the small-set model's own map), cached."""
        cache = folder / "cache" / f"heat-{label_index}-{k:04d}.npy"
        if cache.exists():
            return np.load(cache).astype(np.float32)
        x = np.load(folder / MODEL_INPUT, mmap_mode="r")
        volume = np.load(folder / VOLUME, mmap_mode="r")
        # The slice as a one-slice scan, so that the explainer puts the map back on its
        # pixels the way the bundle's input was cut (resized, or into a head-crop square).
        plane = Scan(
            hu=np.array(volume[k : k + 1]),
            affine=np.eye(4),
            slice_ids=[str(k)],
            spacing=(1.0, 1.0, 1.0),
            windowed=windowed,
        )
        from ichscan.infer.explain import GradCamExplainer

        # One explainer, one caller at a time: Grad-CAM hooks the model copies it holds.
        with self._cam_lock:
            if self.explainer is None:
                self.explainer = GradCamExplainer.from_bundle(self.predictor)
            # A writable copy: torch warns on (and must not touch) the read-only map.
            heat = self.explainer.scan_heatmaps(
                self.predictor, plane, np.array(x[k : k + 1]), label_index
            )[0]
        cache.parent.mkdir(exist_ok=True)
        save_array_atomic(cache, heat.astype(np.float16))
        return heat


def named_as_uploaded(scan: Scan, job: Job) -> Scan:
    """A NIfTI volume or an image names its scan and slices after its file (``head.nii.gz``:
    scan ``head``, slices ``head-0000``...), as ``ichscan predict`` does; here the file is
    the server's ``NNNN`` copy, so the names come from the upload's own file name."""
    from ichscan.io.nifti import _stem as nifti_stem  # predict's naming rule, not a copy

    original = job.names.get(str(job.path))
    if not original:
        return scan
    stem = nifti_stem(Path(original)) if job.kind == "nifti" else Path(original).stem
    stem = stem or original
    ids = [f"{stem}-{k:04d}" for k in range(scan.n_slices)] if job.kind == "nifti" else [stem]
    return dataclasses.replace(
        scan, slice_ids=ids, patient_id=stem, study_uid=stem, series_uid=stem
    )


def prediction_fields(
    predictor: Any, slice_probs: np.ndarray, scan_probs: np.ndarray
) -> dict[str, Any]:
    """Scan-level findings with their decisions, and the per-slice probabilities, with what
    the model was trained on (``trained_on``; ``trained_on_synthetic`` for phantoms)."""
    from ichscan.serve.model import training_note

    labels = list(predictor.labels)
    thresholds = predictor.scan_thresholds  # the findings are scan-level decisions
    findings = [
        {
            "label": label,
            "probability": round(float(scan_probs[j]), 6),
            "threshold": round(float(thresholds[j]), 6),
            "positive": bool(scan_probs[j] >= thresholds[j]),
        }
        for j, label in enumerate(labels)
    ]
    headline = slice_probs[:, 0]
    return {
        **training_note(predictor.bundle.config),
        "labels": labels,
        "headline_label": labels[0],
        "headline_probability": findings[0]["probability"],
        "suspected_ich": findings[0]["positive"],
        "findings": findings,
        "scan_level": "study model" if predictor.backend.has_study else "max over slices",
        "slice_probabilities": np.round(slice_probs.astype(np.float64), 6).tolist(),
        "key_slice": int(np.argmax(headline)) if len(headline) else None,
    }
