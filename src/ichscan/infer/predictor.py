"""Predict: a model bundle applied to scans, per slice and per scan.

`Predictor` holds a loaded bundle and turns a Scan into a `ScanPrediction`:

1. Optional reslicing of a thin series to the bundle's slice thickness (bundle input key
   ``slice_thickness_mm``; absent, slices are read as they come, which is what the training
   cache did — pass ``reslice_mm`` to override).
2. :func:`ichscan.infer.inputs.scan_to_model_input`: windows, channels and size from the
   bundle only.
3. Every ensemble member on the slice and, with TTA, on its horizontal mirror; the
   probabilities are averaged (in probability, not in logit).
4. With a study model: it reads the first member's embeddings of the un-mirrored slices (what
   it was trained on) and gives the refined slice probabilities and the scan probability.
   Without one, the scan probability of a label is the maximum over its slices: a scan is
   positive when any slice is, which is how CQ500 and RSNA read a scan.

Decisions are ``probability >= threshold`` with the bundle's per-label thresholds.

`predict_paths` streams predictions over files and folders (each DICOM series found is its
own scan), yielding ``(path, error)`` for what cannot be read and carrying on. `run_predict`
is the ``ichscan predict`` verb: it writes CSV, JSON or a Kaggle submission
(:mod:`ichscan.infer.writers`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import numpy as np
import torch

from ichscan.errors import IchscanError, InputError
from ichscan.infer.inputs import InputSpec, scan_to_model_input
from ichscan.io.image import read_image
from ichscan.io.load import input_kind
from ichscan.io.nifti import read_nifti
from ichscan.io.series import (
    IGNORED_NAMES,
    NON_DICOM_SUFFIXES,
    discover,
    iter_files,
    refuse_special_file,
)
from ichscan.io.volume import load_series
from ichscan.models.bundle import Bundle, load_bundle, read_config, trained_on
from ichscan.scan import Scan

__all__ = [
    "Failure",
    "PredictError",
    "Predictor",
    "ScanPrediction",
    "iter_scans",
    "pick_device",
    "predict_paths",
    "run_predict",
]

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
_FROM_BUNDLE = "bundle"

Failure = tuple[str, IchscanError]


class PredictError(IchscanError):
    """A prediction run that cannot start: bad options for this model."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(None, f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PredictError(None, f"--device {name!r} is not a device (try cpu or cuda)") from None


@dataclass
class ScanPrediction:
    """One scan's probabilities. ``slice_probs`` is float32 [S, L] in spatial order (feet to
    head for axial DICOM), ``scan_probs`` float32 [L], both in ``labels`` order; decisions
    (``slice_positive``, ``scan_positive``) are ``probability >= threshold``. ``kind`` is
    the reader's format: "dicom", "nifti", "image" (or "volume" for a Scan made in memory)."""

    scan: str
    source: str
    kind: str
    labels: list[str]
    thresholds: np.ndarray
    slice_ids: list[str]
    slice_probs: np.ndarray
    scan_probs: np.ndarray
    study_model: bool = False
    resliced_mm: float | None = None
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    embeddings: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    # The scan decision's thresholds, when the bundle chose them on validation scans
    # (Predictor.scan_thresholds); None: the slice thresholds decide the scan too.
    scan_thresholds: np.ndarray | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slice_ids)

    @property
    def slice_positive(self) -> np.ndarray:
        return self.slice_probs >= self.thresholds

    @property
    def scan_positive(self) -> np.ndarray:
        chosen = self.thresholds if self.scan_thresholds is None else self.scan_thresholds
        return self.scan_probs >= chosen

    @property
    def is_volume(self) -> bool:
        """A DICOM series or a NIfTI volume (gets a row in the per-scan table), not a PNG."""
        return self.kind != "image"

    def to_dict(self, *, slices: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scan": self.scan,
            "source": self.source,
            "kind": self.kind,
            "patient_id": self.patient_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "n_slices": self.n_slices,
            "resliced_mm": self.resliced_mm,
            "scan_level": "study model" if self.study_model else "max over slices",
            "probabilities": _by_label(self.labels, self.scan_probs),
            "positive": _by_label(self.labels, self.scan_positive),
            "warnings": list(self.warnings),
        }
        if slices:
            out["slices"] = [
                {
                    "id": sid,
                    "slice_index": k,
                    "probabilities": _by_label(self.labels, self.slice_probs[k]),
                    "positive": _by_label(self.labels, self.slice_positive[k]),
                }
                for k, sid in enumerate(self.slice_ids)
            ]
        return out


def _by_label(labels: Sequence[str], values: np.ndarray) -> dict[str, Any]:
    if values.dtype == bool:
        return {name: bool(v) for name, v in zip(labels, values, strict=True)}
    return {name: round(float(v), 6) for name, v in zip(labels, values, strict=True)}


class Backend(Protocol):
    has_study: bool

    def slices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, 3, H, W] → (mean probabilities [N, L], first member's embeddings [N, D])."""
        ...

    def study(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[S, D] embeddings of one scan → (slice probabilities [S, L], scan [L])."""
        ...


# Images per network pass on a CPU, by backbone family. Passes of 4 made inference 1.9x
# faster for EfficientNet-Lite0 and 1.4x for DenseNet121 (benchmarks/predict_scan.py --arch,
# 2-core CPU, 256 px, mirror TTA, session 8): their activations are large for the arithmetic
# done on them, and only a few images' fit the CPU cache. ResNet18 ran 8-15% faster with the
# batch whole, so it and the families not measured keep one pass per batch. The small-set
# networks chunk themselves the same way (models.small_set.CPU_CHUNK). A GPU takes the
# batch whole.
CPU_PASS = 4
SMALL_PASS_FAMILIES = ("efficientnet", "densenet")


def cpu_pass(architecture: str) -> int | None:
    """Images per network pass on a CPU for a bundle's architecture (None: the whole batch)."""
    return CPU_PASS if architecture.startswith(SMALL_PASS_FAMILIES) else None


class TorchBackend:
    """The bundle's PyTorch models on a device."""

    def __init__(self, bundle: Bundle, device: torch.device, batch_size: int, tta: bool) -> None:
        # Channels-last convolutions: ~1.3x the CPU throughput of NCHW for ResNet18.
        self.members = [
            m.to(device, memory_format=torch.channels_last).eval() for m in bundle.members
        ]
        self.study_model = bundle.study.to(device).eval() if bundle.study is not None else None
        self.device = device
        self.batch_size = batch_size
        self.tta = tta
        self.cpu_pass = cpu_pass(bundle.config["architecture"])

    @property
    def has_study(self) -> bool:
        return self.study_model is not None

    @torch.inference_mode()
    def slices(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, embs = [], []
        for start in range(0, len(x), self.batch_size):
            batch = torch.from_numpy(x[start : start + self.batch_size]).to(self.device)
            n = len(batch)
            # Mirror in the same forward pass: one bigger batch beats two small ones.
            views = torch.cat([batch, batch.flip(3)]) if self.tta else batch
            views = views.contiguous(memory_format=torch.channels_last)
            total = None
            for i, member in enumerate(self.members):
                emb = self._embed(member, views)
                p = torch.sigmoid(member.head(emb).float())
                p = p.view(-1, n, p.shape[-1]).mean(0)
                total = p if total is None else total + p
                if i == 0:
                    embs.append(emb[:n].float().cpu().numpy())
            assert total is not None
            probs.append((total / len(self.members)).cpu().numpy())
        return np.concatenate(probs), np.concatenate(embs)

    def _embed(self, member: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu" or self.cpu_pass is None or len(views) <= self.cpu_pass:
            return member.embed(views)
        return torch.cat([member.embed(part) for part in views.split(self.cpu_pass)])

    @torch.inference_mode()
    def study(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.study_model is not None
        emb = torch.from_numpy(embeddings).float().unsqueeze(0).to(self.device)
        slice_logits, scan_logits = self.study_model(emb)
        return (
            torch.sigmoid(slice_logits[0]).cpu().numpy(),
            torch.sigmoid(scan_logits[0]).cpu().numpy(),
        )


def thresholds_chosen_on(config: dict[str, Any], study_decides: bool) -> str | None:
    """The probabilities the thresholds in use were tuned on, "slices" or "scans"; None when
    they were not tuned or the bundle does not say. ``study_decides``: the study model's
    thresholds are the ones in use (Predictor decides that once). A slice model's thresholds
    are always chosen on slice probabilities (validation fold, or inner CV of the training
    slices); a study model's on its slice or its scan outputs, which its threshold_level
    says (the end of its threshold_method in bundles from before that was recorded)."""
    if study_decides:
        study = config.get("study_model") or {}
        if study.get("threshold_level") in ("slices", "scans"):
            return str(study["threshold_level"])
        method = str(study.get("threshold_method", ""))
        return (
            "scans" if method.endswith("scans") else "slices" if method.endswith("slices") else None
        )
    method = str(config.get("threshold_method", ""))
    return None if not method or method.startswith("default") else "slices"


class Predictor:
    """A bundle ready to predict scans (see the module notes).

    ``backend="onnx"`` runs ``MODEL_DIR/model.onnx`` (and ``model.study.onnx``) written by
    :func:`ichscan.infer.onnx_export.export_onnx` with onnxruntime on the CPU, or the files
    named by ``onnx_path``. ``reslice_mm`` overrides the bundle's slice thickness (None: read
    slices as they come). ``keep_embeddings`` keeps the per-slice embeddings in each
    ScanPrediction.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        device: str = "auto",
        batch_size: int = 32,
        tta: bool | None = None,
        *,
        backend: Literal["torch", "onnx"] = "torch",
        onnx_path: str | Path | None = None,
        reslice_mm: float | str | None = _FROM_BUNDLE,
        keep_embeddings: bool = False,
    ) -> None:
        if batch_size < 1:
            raise PredictError(None, f"--batch-size must be at least 1, not {batch_size}")
        if tta is None:
            # The thresholds were tuned on the views the bundle names; predict the same way.
            config = bundle.config if isinstance(bundle, Bundle) else read_config(bundle)
            tta = "hflip" in config.get("input", {}).get("tta", [])
        if backend == "torch":
            dev = pick_device(device)
            self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, dev)
            self.backend: Backend = TorchBackend(self.bundle, dev, batch_size, tta)
        elif backend == "onnx":
            from ichscan.infer.onnx_export import OnnxPredictor

            root = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
            config = bundle.config if isinstance(bundle, Bundle) else read_config(root)
            self.bundle = Bundle(config, root)
            self.backend = OnnxPredictor.for_bundle(root, onnx_path, batch_size, tta)
        else:
            raise PredictError(None, f"--backend must be 'torch' or 'onnx', not {backend!r}")
        self.spec = InputSpec.from_bundle(self.bundle.input)
        self.labels = self.bundle.labels
        # With a study model its probabilities are the ones decided on, so its thresholds
        # (chosen on its own validation outputs) apply; older bundles lack them.
        study = self.bundle.config.get("study_model") or {}
        # One decision for the thresholds and the words for how they were chosen ("" when
        # the bundle does not say), so the two never come from different models.
        decider = study if self.backend.has_study and "thresholds" in study else None
        chosen = self.bundle.thresholds if decider is None else decider["thresholds"]
        self.thresholds = np.array(
            [float(chosen.get(name, 0.5)) for name in self.labels], dtype=np.float64
        )
        self.threshold_method = str(
            (self.bundle.config if decider is None else decider).get("threshold_method", "")
        )
        self.thresholds_chosen_on = thresholds_chosen_on(self.bundle.config, decider is not None)
        # The scan score has thresholds of its own where the bundle chose them on validation
        # scans: a slice model's for the max over slices, a study model's for its scan head
        # (pooled over the scan, calibrated apart from its slice head). A study model from
        # before those were chosen decides scans at its slice thresholds, as it always did.
        by_scan = (
            study.get("scan_thresholds")
            if self.backend.has_study
            else self.bundle.config.get("scan_thresholds")
        )
        self.scan_thresholds_tuned = bool(by_scan)
        self.scan_thresholds_note = (
            "this bundle's study model predates its own scan thresholds: scans are decided "
            "at its slice thresholds (run `ichscan train-study` again to choose them)"
            if self.backend.has_study and not by_scan
            else None
        )
        self.scan_thresholds = (
            np.array(
                [
                    float(by_scan.get(n, t))
                    for n, t in zip(self.labels, self.thresholds, strict=True)
                ]
            )
            if self.scan_thresholds_tuned
            else self.thresholds
        )
        if reslice_mm == _FROM_BUNDLE:
            reslice_mm = self.bundle.input.get("slice_thickness_mm")
        self.reslice_mm = float(reslice_mm) if reslice_mm is not None else None
        if self.reslice_mm is not None and not self.reslice_mm > 0:
            raise PredictError(None, f"--reslice must be above 0 mm, not {reslice_mm}")
        self.keep_embeddings = keep_embeddings

    @property
    def image_window(self) -> str:
        """The window a PNG/JPEG slice is taken to be in: the one the model was trained on."""
        return self.spec.source_window or "unknown"

    def prepare(self, scan: Scan) -> tuple[Scan, np.ndarray]:
        """The scan as the model reads it (resliced when the bundle says so) and its input."""
        scan = self.reslice(scan)
        return scan, scan_to_model_input(scan, self.spec)

    def reslice(self, scan: Scan) -> Scan:
        """The scan on ``reslice_mm`` slabs when it is a thinner series, else as it is."""
        t = self.reslice_mm
        from ichscan.preprocess.reslice import is_thinner, reslice_scan

        if t is None or scan.windowed or scan.n_slices < 2 or not is_thinner(scan.spacing[0], t):
            return scan

        try:
            return reslice_scan(scan, t)
        except ValueError as exc:
            raise InputError(scan.source, f"cannot reslice to {t:g} mm ({exc})") from None

    def predict_inputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [S, 3, H, W] slices of one scan → (slice probs [S, L], scan probs [L],
        embeddings [S, D])."""
        slice_probs, emb = self.backend.slices(x)
        if self.backend.has_study:
            slice_probs, scan_probs = self.backend.study(emb)
        else:
            scan_probs = slice_probs.max(axis=0)
        return slice_probs.astype(np.float32), scan_probs.astype(np.float32), emb

    def predict_scan(self, scan: Scan) -> ScanPrediction:
        resliced, x = self.prepare(scan)
        slice_probs, scan_probs, emb = self.predict_inputs(x)
        return ScanPrediction(
            scan=scan_name(scan),
            source=scan.source,
            kind=str(scan.metadata.get("format") or ("image" if scan.windowed else "volume")),
            labels=list(self.labels),
            thresholds=self.thresholds,
            scan_thresholds=self.scan_thresholds,
            slice_ids=list(resliced.slice_ids),
            slice_probs=slice_probs,
            scan_probs=scan_probs,
            study_model=self.backend.has_study,
            resliced_mm=self.reslice_mm if resliced is not scan else None,
            patient_id=scan.patient_id,
            study_uid=scan.study_uid,
            series_uid=scan.series_uid,
            embeddings=emb if self.keep_embeddings else None,
            warnings=list(scan.warnings),
        )


def scan_name(scan: Scan) -> str:
    """SeriesInstanceUID for DICOM, file stem for NIfTI and images (their readers put the
    stem in series_uid too). A UID that another patient's or study's slices also carry
    (split apart on reading) is not a key: the patient and study are added."""
    name = scan.series_uid or Path(scan.source).stem
    if scan.metadata.get("series_uid_shared"):
        name += f" [patient {scan.patient_id or '-'}; study {scan.study_uid or '-'}]"
    return name


# ---------------------------------------------------------------------------------------
# Inputs


def _is_dicom_candidate(path: Path) -> bool:
    return not (
        path.name in IGNORED_NAMES
        or path.name.startswith(".")
        or path.suffix.lower() in NON_DICOM_SUFFIXES
    )


def _is_mask(path: Path) -> bool:
    """``<stem>_mask.nii[.gz]`` is a label map beside its scan (the adapters' convention),
    not a scan: skipped in folders (a file named on its own is still read)."""
    name = path.name.lower()
    return name.endswith(("_mask.nii", "_mask.nii.gz"))


def _discovered(path: Path, *, workers: int | None) -> Iterator[Scan | Failure]:
    """Every series under a DICOM file, folder or zip as its own scan, then its bad files."""
    try:
        found = discover(path)
    except InputError as exc:
        yield str(path), exc
        return
    for series in found.series:
        # Name the series' own folder (or file, or zip), not the folder the user gave.
        source = os.path.commonpath([h.path for h in series.headers])
        try:
            scan = load_series(series, workers=workers, source=source)
        except InputError as exc:
            yield f"{found.source} (series {series.series_uid})", exc
            continue
        except MemoryError:
            yield source, InputError(source, "not enough memory to read this series")
            continue
        yield scan
        if series.shares_uid:
            # Mixed input: predicted, but the user must hear it as a problem (exit 1).
            yield (
                source,
                InputError(
                    source,
                    f"SeriesInstanceUID {series.series_uid} also names another patient's or "
                    f"study's slices: predicted apart, as {scan_name(scan)}",
                ),
            )
        # Slices that were listed but could not be decoded: the scan went on without them,
        # and the batch reports each, as it does the files discovery could not read.
        for path, reason in scan.metadata.get("unreadable_slices", []):
            yield path, InputError(path, reason)
    for bad in found.bad_files:
        yield bad.path, InputError(bad.path, bad.reason)


def iter_scans(
    path: str | Path, *, image_window: str = "unknown", workers: int | None = None
) -> Iterator[Scan | Failure]:
    """The scans under one input path, or ``(path, error)`` for each part that cannot be
    read: a NIfTI volume, a PNG/JPEG slice, a DICOM file, zip or folder (each series its own
    scan). A folder may mix images, NIfTI volumes and DICOM; ``*_mask.nii[.gz]`` label maps
    in it are skipped."""
    path = Path(path)
    if not path.exists():
        yield str(path), InputError(path, "no such file or folder")
        return
    try:
        refuse_special_file(path)
    except InputError as exc:
        yield str(path), exc
        return
    if path.is_file():
        kind = input_kind(path)
        try:
            if kind == "nifti":
                yield read_nifti(path)
            elif kind == "image":
                yield read_image(path, window=image_window)
            else:
                yield from _discovered(path, workers=workers)
        except InputError as exc:
            yield str(path), exc
        except MemoryError:
            # Within every cap and still too large for this machine: this input's fault to
            # report, not the batch's end.
            yield str(path), InputError(path, "not enough memory to read it")
        return
    files = list(iter_files(path))
    singles = [
        f
        for f in files
        if input_kind(f) in ("nifti", "image") and not f.name.startswith(".") and not _is_mask(f)
    ]
    for file in singles:
        yield from iter_scans(file, image_window=image_window, workers=workers)
    if any(input_kind(f) == "dicom" and _is_dicom_candidate(f) for f in files):
        yield from _discovered(path, workers=workers)
    elif not singles:
        yield str(path), InputError(path, "no DICOM, NIfTI or image files found")


def predict_paths(
    paths: Iterable[str | Path],
    predictor: Predictor,
    on_error: Literal["yield", "raise"] = "yield",
    *,
    workers: int | None = None,
) -> Iterator[ScanPrediction | Failure]:
    """A ScanPrediction for every scan under ``paths``, in order; for every input (or part
    of one) that cannot be read or predicted, ``(path, error)`` with ``on_error="yield"``
    (the rest carry on) or the error raised with ``on_error="raise"``."""
    for path in paths:
        for item in iter_scans(path, image_window=predictor.image_window, workers=workers):
            if isinstance(item, Scan):
                source = item.source or str(path)
                try:
                    item = predictor.predict_scan(item)
                except IchscanError as exc:
                    item = (source, exc)
                except MemoryError:
                    item = (source, InputError(source, "not enough memory to predict it"))
            if isinstance(item, tuple) and on_error == "raise":
                raise item[1]
            yield item


# ---------------------------------------------------------------------------------------
# The `ichscan predict` verb


def run_predict(
    inputs: Sequence[str | Path],
    model_dir: str | Path,
    out: str | Path,
    *,
    backend: Literal["torch", "onnx"] = "torch",
    batch_size: int = 32,
    device: str = "auto",
    fmt: str | None = None,
    tta: bool | None = None,
    progress: bool = True,
    errors: TextIO | None = None,
    workers: int | None = None,
    reslice_mm: float | str | None = _FROM_BUNDLE,
    onnx_path: str | Path | None = None,
) -> int:
    """Predict every scan under ``inputs`` and write ``out`` (see writers for the formats;
    ``fmt`` None picks json for a .json name, else csv). Prints one line per bad input,
    ``path: problem``, to ``errors`` (stderr by default) and a progress bar over inputs.

    Returns 0 when everything was predicted, 1 when some inputs were bad (listed), 2 when
    nothing at all could be predicted. Raises IchscanError when the run cannot start (bad
    model folder, unknown format, Kaggle format for a non-RSNA model).
    ``reslice_mm``: thin series are resliced to this thickness first ("bundle": the one the
    bundle records, if any; None: never). ``onnx_path``: the ONNX file for backend onnx
    (default MODEL/model.onnx).
    """
    from ichscan.infer.writers import check_format, open_writer
    from ichscan.progress import progress_bar

    errors = errors if errors is not None else sys.stderr
    fmt = check_format(fmt, out)
    model_dir = Path(model_dir)
    if fmt == "kaggle":
        _check_kaggle(model_dir)
    # The Kaggle rows must name the challenge's own images: never replace them by slabs.
    if fmt == "kaggle":
        if reslice_mm not in (_FROM_BUNDLE, None):
            raise PredictError(
                None, "--reslice with --format kaggle: the rows must name the challenge's slices"
            )
        reslice_mm = None
    predictor = Predictor(
        model_dir,
        device,
        batch_size,
        tta,
        backend=backend,
        onnx_path=onnx_path,
        reslice_mm=reslice_mm,
    )
    if progress:  # the console run: say what the figures rest on (the JSON says it too)
        print(f"model trained on {trained_on(predictor.bundle.config)}", file=sys.stderr)
        if predictor.scan_thresholds_note:
            print(f"note: {predictor.scan_thresholds_note}", file=sys.stderr)
    n_ok = n_bad = 0
    writer = open_writer(fmt, out, predictor)
    try:
        bar = progress_bar(
            inputs, unit="input", desc="predict", disable=not progress, file=sys.stderr
        )
        for path in bar:
            for item in predict_paths([path], predictor, workers=workers):
                if isinstance(item, ScanPrediction):
                    writer.add(item)
                    n_ok += 1
                else:
                    n_bad += 1
                    writer.fail(*item)
                    bar.clear()
                    print(_error_line(*item), file=errors, flush=True)
    except BaseException:
        writer.abort()
        raise
    written = writer.close()
    if progress:
        bad = f"; {n_bad} problem(s), listed above" if n_bad else ""
        names = " and ".join(str(p) for p in written)
        print(f"wrote {names}: {n_ok} scan(s){bad}", file=sys.stderr)
    if n_ok == 0:
        return EXIT_ERROR
    return EXIT_PARTIAL if n_bad else EXIT_OK


def _error_line(path: str, exc: IchscanError) -> str:
    """An error that names its own file is printed as it is; otherwise the input is named."""
    return str(exc) if exc.path else f"{path}: {exc.problem}"


def _check_kaggle(model_dir: Path) -> None:
    config = read_config(model_dir)
    if config.get("label_set") != "rsna":
        raise PredictError(
            model_dir,
            "--format kaggle writes an RSNA 2019 submission (ID_<image>_<subtype>); this model "
            f"predicts the {config.get('label_set')} labels ({', '.join(config['labels'])})",
        )
