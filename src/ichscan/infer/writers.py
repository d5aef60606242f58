"""Where predictions go: CSV (per slice, plus a per-scan table), JSON, or an RSNA 2019 Kaggle
submission. Every writer streams (a run over thousands of scans never holds them all),
writes under a temporary name and renames when done, so a crashed run leaves no file that
looks finished.

CSV (``preds.csv``), one row per slice::

    scan, id, slice_index, <label>..., <label>_positive...

``scan`` is the SeriesInstanceUID (DICOM) or file stem (NIfTI, image); ``id`` the SOP Instance
UID or file stem (``slab-NNN`` for a resliced series); probabilities with 6 decimals;
decisions 0/1 at the bundle thresholds. When any input is a series or a volume, a second
file beside it, ``preds.scans.csv``, has one row per scan::

    scan, n_slices, <label>..., <label>_positive..., source

``source`` is the file, folder or zip the scan was read from (a folder and a zip of it hold
the same scan keys).

JSON: ``{"model", "labels", "thresholds", "scans": [...], "errors": [...]}`` with each scan's
probabilities, decisions and slices (:meth:`ScanPrediction.to_dict`).

Kaggle (RSNA bundles only): ``ID,Label`` with one row ``ID_<image>_<label>`` per slice and
label, the challenge's submission format.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ichscan.errors import IchscanError
from ichscan.models.bundle import trained_on

if TYPE_CHECKING:
    from ichscan.infer.predictor import Predictor, ScanPrediction

__all__ = ["FORMATS", "check_format", "open_writer", "scans_csv_path"]

FORMATS = ("csv", "json", "kaggle")
RESEARCH_NOTE = "ichscan is research software, not a medical device"


def check_format(fmt: str | None, out: str | Path) -> str:
    """The output format: as given, or json for a .json name and csv otherwise."""
    if fmt is None:
        return "json" if Path(out).suffix.lower() == ".json" else "csv"
    if fmt not in FORMATS:
        raise IchscanError(None, f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def scans_csv_path(out: str | Path) -> Path:
    """preds.csv → preds.scans.csv (beside it)."""
    out = Path(out)
    stem = out.stem if out.suffix.lower() == ".csv" else out.name
    return out.with_name(f"{stem}.scans.csv")


def _temp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open(_temp(path), "w", newline="")
    except OSError as exc:
        raise IchscanError(path, f"cannot write the output ({exc.strerror})") from None


def _p(value: float) -> str:
    return f"{float(value):.6f}"


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.file = _open(out)

    def add(self, pred: ScanPrediction) -> None:
        raise NotImplementedError

    def fail(self, path: str, error: IchscanError) -> None:
        """An input that could not be predicted (only JSON records it)."""

    def close(self) -> list[Path]:
        self.file.close()
        _temp(self.out).replace(self.out)
        return [self.out]

    def abort(self) -> None:
        self.file.close()
        _temp(self.out).unlink(missing_ok=True)


class CsvWriter(_Writer):
    def __init__(self, out: Path, predictor: Predictor) -> None:
        super().__init__(out)
        self.labels = list(predictor.labels)
        self.rows = csv.writer(self.file)
        self.rows.writerow(["scan", "id", "slice_index", *self._label_columns()])
        self.scan_rows: list[list[Any]] = []
        self.any_volume = False

    def _label_columns(self) -> list[str]:
        return [*self.labels, *(f"{name}_positive" for name in self.labels)]

    def add(self, pred: ScanPrediction) -> None:
        positive = pred.slice_positive
        for k, sid in enumerate(pred.slice_ids):
            self.rows.writerow(
                [
                    pred.scan,
                    sid,
                    k,
                    *(_p(v) for v in pred.slice_probs[k]),
                    *(int(v) for v in positive[k]),
                ]
            )
        self.any_volume |= pred.is_volume
        # One short row per scan: kept to write at the end, when it is known whether any
        # input was a series or volume at all.
        self.scan_rows.append(
            [
                pred.scan,
                pred.n_slices,
                *(_p(v) for v in pred.scan_probs),
                *(int(v) for v in pred.scan_positive),
                pred.source,
            ]
        )

    def close(self) -> list[Path]:
        written = super().close()
        scans = scans_csv_path(self.out)
        if not self.any_volume:
            scans.unlink(missing_ok=True)  # a stale table from an earlier run would mislead
            return written
        with _open(scans) as f:
            table = csv.writer(f)
            table.writerow(["scan", "n_slices", *self._label_columns(), "source"])
            table.writerows(self.scan_rows)
        _temp(scans).replace(scans)
        return [*written, scans]


class JsonWriter(_Writer):
    def __init__(self, out: Path, predictor: Predictor) -> None:
        super().__init__(out)
        head = {
            "model": str(predictor.bundle.root),
            "architecture": predictor.bundle.config.get("architecture"),
            "label_set": predictor.bundle.config.get("label_set"),
            "trained_on": trained_on(predictor.bundle.config),
            "labels": list(predictor.labels),
            "thresholds": dict(
                zip(predictor.labels, map(float, predictor.thresholds), strict=True)
            ),
            # What each scan's "positive" is decided at (the slice thresholds unless the
            # bundle chose its own for the scan score).
            "scan_thresholds": dict(
                zip(predictor.labels, map(float, predictor.scan_thresholds), strict=True)
            ),
            "research_use_only": RESEARCH_NOTE,
        }
        if predictor.scan_thresholds_note:
            head["scan_thresholds_note"] = predictor.scan_thresholds_note
        # Streamed: the head object without its closing brace, then the scans one by one.
        self.file.write(json.dumps(head, indent=1)[:-2] + ',\n "scans": [\n')
        self.first = True
        self.errors: list[dict[str, str]] = []

    def add(self, pred: ScanPrediction) -> None:
        if not self.first:
            self.file.write(",\n")
        self.file.write(json.dumps(pred.to_dict()))
        self.first = False

    def fail(self, path: str, error: IchscanError) -> None:
        self.errors.append({"path": path, "problem": error.problem, "message": str(error)})

    def close(self) -> list[Path]:
        self.file.write('\n ],\n "errors": ' + json.dumps(self.errors) + "\n}\n")
        return super().close()


class KaggleWriter(_Writer):
    def __init__(self, out: Path, predictor: Predictor) -> None:
        super().__init__(out)
        self.labels = list(predictor.labels)
        self.rows = csv.writer(self.file)
        self.rows.writerow(["ID", "Label"])

    def add(self, pred: ScanPrediction) -> None:
        for k, sid in enumerate(pred.slice_ids):
            image = sid if sid.startswith("ID_") else f"ID_{sid}"
            self.rows.writerows(
                [f"{image}_{name}", _p(p)]
                for name, p in zip(self.labels, pred.slice_probs[k], strict=True)
            )


def open_writer(fmt: str, out: str | Path, predictor: Predictor) -> _Writer:
    cls = {"csv": CsvWriter, "json": JsonWriter, "kaggle": KaggleWriter}[fmt]
    return cls(Path(out), predictor)
