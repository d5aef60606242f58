"""Dataset adapters: every public head CT layout in, one manifest (one row per slice) out.

Layouts (``detect_layout`` tells them apart, in this order):

- ``rsna``: ``stage_2_train.csv`` (or ``stage_1_train.csv``) with rows
  ``ID_<image>_<subtype>,<0|1>`` beside a folder of ``ID_<image>.dcm`` files. Labels are per
  slice; only DICOM headers are read, to group slices into series and order them in space.
- ``cq500``: ``reads.csv`` (three radiologists x 14 findings) beside one folder (or one
  ``CQ500-CT-<n>.zip``) per patient. Labels are per scan (majority of the readers who
  answered); the best series of each patient is chosen and, by default, read as 5 mm slabs
  (``series`` rows: see ``slab_rows``).
- ``nifti``: ``*.nii[.gz]`` volumes (``*_mask.nii[.gz]`` are masks, not scans) and an optional
  ``labels.csv`` with ``id`` and scan-level label columns; slice labels come from the masks
  when every volume has one.
- ``images``: ``images/`` with PNG/JPEG slices and ``labels.csv`` (``id`` + label columns),
  the slices already in a display window.
- ``dicom``: any folder of DICOM: each study's chosen series, labels -1 (prediction-only
  manifests) unless a ``slice_truth.csv`` (``sop_uid`` + label columns, as ``ichscan synth``
  writes) gives them per slice.

Each adapter returns ``(manifest, report, label_set)``. The report accounts for everything
that did not become a labelled row (files without labels, labels without files, unreadable
files, duplicate label rows), so nothing is dropped without being counted; its `notes` say
what was chosen (a patient's series, masks read as masks).
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichscan.errors import InputError, one_line
from ichscan.io.dicom import check_ct_slice, read_header
from ichscan.io.image import IMAGE_SUFFIXES
from ichscan.io.nifti import has_a_number, open_nifti
from ichscan.io.series import (
    IGNORED_NAMES,
    NON_DICOM_SUFFIXES,
    Discovery,
    Series,
    discover,
    iter_files,
    selection_key,
)
from ichscan.io.volume import default_workers
from ichscan.labels import CQ500, CQ500_COLUMNS, RSNA, LabelSet, detect_label_set, get_label_set
from ichscan.preprocess.reslice import is_thinner, slab_plan
from ichscan.preprocess.select import in_middle

from .manifest import UNKNOWN, empty_manifest, normalise, write_manifest

LAYOUTS = ("rsna", "cq500", "images", "nifti", "dicom")
# Layouts whose label set is fixed: a --labels that differs is refused before any work.
FIXED_LABEL_SETS = {"rsna": RSNA.name, "cq500": CQ500.name}
# Layouts read as whole DICOM series, which can be cut into slabs: RSNA's slices are
# labelled one by one (often a sample of a series), NIfTI and images are read as they come.
SLAB_LAYOUTS = ("cq500", "dicom")
# DESIGN.md: the chosen CQ500 series is resampled to 5 mm along the patient axis.
CQ500_SLAB_MM = 5.0
# The label sets a NIfTI label map gives per slice (see mask_slice_labels).
MASK_LABELS = (RSNA.labels, ("hemorrhage",))
# `ichscan synth` calls the image folder layout "png".
LAYOUT_ALIASES = {"png": "images"}
RSNA_CSVS = ("stage_2_train.csv", "stage_1_train.csv")
# Where the challenge's own archives unpack the training DICOM, per stage.
RSNA_IMAGE_DIRS = (
    "stage_2_train",
    "stage_2_train_images",
    "stage_1_train",
    "stage_1_train_images",
)
CQ500_READS = "reads.csv"
CQ500_READERS = ("R1", "R2", "R3")
LABELS_CSV = "labels.csv"
# Per-slice ground truth beside a DICOM folder, keyed by SOP Instance UID (`ichscan synth`).
SLICE_TRUTH_CSV = "slice_truth.csv"
SLICE_TRUTH_EXTRA = ("scan", "series_uid", "slice_index")
IMAGES_DIR = "images"
ID_COLUMNS = ("id", "image_id", "image", "filename", "file", "name", "scan_id")
PATIENT_COLUMNS = ("patient_id", "patient", "patientid")
DEFAULT_IMAGE_WINDOW = "brain"
# How many entries of each list the report keeps when written into a manifest's metadata:
# the counts stay exact, the lists are examples (RSNA can have thousands).
LISTED_IN_FACTS = 50
# Below this many files a process pool costs more than it saves.
MIN_FILES_FOR_POOL = 1000
HEADER_CHUNK = 512

_NUMBER = re.compile(r"CQ500[\s_-]*CT[\s_-]*(\d+)", re.IGNORECASE)
_KNOWN_SUFFIX = r"(?i)\.(?:png|jpe?g|bmp|tiff?|nii(?:\.gz)?|dcm)$"


@dataclass
class AdapterReport:
    """What an adapter did with everything it found; written into the manifest's facts."""

    layout: str
    n_rows: int = 0
    n_scans: int = 0
    n_patients: int = 0
    problems: list[str] = field(default_factory=list)
    files_without_labels: list[str] = field(default_factory=list)
    labels_without_files: list[str] = field(default_factory=list)
    duplicate_label_rows: int = 0
    bad_files: list[dict[str, str]] = field(default_factory=list)
    # What the adapter decided that is no fault of the data (which series it chose, which
    # files it read as masks): kept apart from the problems a user has to look at.
    notes: list[str] = field(default_factory=list)
    label_level: str = "slice"
    source: str = ""
    # How scans were cut: DICOM series read as slabs of this thickness (None: the native
    # slices), and only the middle N slices of each scan kept (None: all).
    slab_mm: float | None = None
    middle_slices: int | None = None

    def facts(self) -> dict[str, Any]:
        """What a manifest or cache must carry for its rows to be read and trained on
        right: the layout, whether labels are per slice or copied from the scan, and how
        the scans were cut (a `series` row is only a slab at its slab thickness)."""
        out: dict[str, Any] = {
            "layout": self.layout,
            "label_level": self.label_level,
            "source": self.source,
        }
        if self.slab_mm is not None:
            out["slab_mm"] = self.slab_mm
        if self.middle_slices is not None:
            out["middle_slices"] = self.middle_slices
        return out

    def to_dict(self, max_listed: int | None = LISTED_IN_FACTS) -> dict[str, Any]:
        """Counts exactly, lists cut to `max_listed` examples (None keeps them whole)."""
        out = asdict(self)
        for key in (
            "files_without_labels",
            "labels_without_files",
            "bad_files",
            "problems",
            "notes",
        ):
            out[f"n_{key}"] = len(out[key])
            if max_listed is not None:
                out[key] = out[key][:max_listed]
        return out

    def summary(self) -> str:
        """One line for a CLI."""
        parts = [
            f"{self.layout}: {self.n_rows} row(s), {self.n_scans} scan(s), "
            f"{self.n_patients} patient(s)"
        ]
        for count, what in (
            (len(self.files_without_labels), "file(s) without labels"),
            (len(self.labels_without_files), "label(s) without files"),
            (len(self.bad_files), "unreadable file(s)"),
            (self.duplicate_label_rows, "duplicate label row(s) dropped"),
        ):
            if count:
                parts.append(f"{count} {what}")
        return "; ".join(parts)


Adapted = tuple[pd.DataFrame, AdapterReport, LabelSet]


# --------------------------------------------------------------------------- detection


def detect_layout(root: str | Path) -> str:
    """Which of LAYOUTS the folder holds; InputError listing what was looked for if none."""
    root = _dataset_root(root)
    if any((root / name).is_file() for name in RSNA_CSVS):
        return "rsna"
    if (root / CQ500_READS).is_file():
        return "cq500"
    if next(_nifti_files(root), None) is not None:
        return "nifti"
    if (root / LABELS_CSV).is_file() and _image_dir(root) is not None:
        return "images"
    if next(_candidate_dicom_files(root), None) is not None:
        return "dicom"
    raise InputError(
        root,
        "no dataset layout found: looked for "
        f"{' or '.join(RSNA_CSVS)} (RSNA), {CQ500_READS} (CQ500), *.nii / *.nii.gz (NIfTI), "
        f"{IMAGES_DIR}/ with PNG/JPEG + {LABELS_CSV} (image folder), and DICOM files",
    )


def _dataset_root(root: str | Path) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise InputError(root, "no such folder")
    if not root.is_dir():
        raise InputError(root, "expected a dataset folder, got a file")
    return root


def _nifti_files(root: Path) -> Iterator[Path]:
    return (p for p in iter_files(root) if p.name.lower().endswith((".nii", ".nii.gz")))


def _image_dir(root: Path) -> Path | None:
    """images/ if it exists, else the root itself when it holds image files."""
    if (root / IMAGES_DIR).is_dir():
        return root / IMAGES_DIR
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir() if p.is_file()):
        return root
    return None


def _candidate_dicom_files(root: Path) -> Iterator[Path]:
    for path in iter_files(root):
        name = path.name
        if name in IGNORED_NAMES or name.startswith("."):
            continue
        if path.suffix.lower() in NON_DICOM_SUFFIXES:
            continue
        yield path


# --------------------------------------------------------------------------- entry points


def build_manifest(
    root: str | Path,
    *,
    layout: str | None = None,
    labels: str | None = None,
    workers: int | None = None,
    window: str = DEFAULT_IMAGE_WINDOW,
    masks: bool | None = None,
    thickness: float | str | None = "auto",
    middle: int | None = None,
) -> Adapted:
    """Detect (or take) the layout and adapt it. `labels` names a label set: it is required
    to match for rsna/cq500, chosen for images/nifti/dicom (else detected / defaulted).
    `workers` (rsna, cq500) sizes the header-reading process pool; `window` (images) names the
    window the pixels are in; `masks` (nifti) takes slice labels from `*_mask` label maps
    (None: when every volume has one). `thickness` (cq500, dicom): read each chosen series
    that is thinner as slabs of that many mm (`series` rows, see `slab_rows`); "auto" is
    DESIGN.md's 5 mm for CQ500 and the native slices elsewhere, "native" or None the native
    slices. `middle`: keep the middle N slices (or slabs) of each scan."""
    layout = LAYOUT_ALIASES.get(layout or "", layout) or detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    fixed = FIXED_LABEL_SETS.get(layout)
    if labels is not None and fixed is not None and labels != fixed:
        # Checked before any header is read: that takes minutes on a full RSNA set.
        raise InputError(root, f"the {layout} layout carries the {fixed} label set, not {labels}")
    slab_mm = slab_thickness(root, layout, thickness)
    if middle is not None and middle < 1:
        raise ValueError(f"middle must be a positive slice count, got {middle}")
    if layout == "rsna":
        result = adapt_rsna(root, workers=workers)
    elif layout == "cq500":
        result = adapt_cq500(root, workers=workers, slab_mm=slab_mm)
    elif layout == "images":
        result = adapt_images(root, labels=labels, window=window)
    elif layout == "nifti":
        result = adapt_nifti(root, labels=labels, masks=masks)
    else:
        result = adapt_dicom(root, labels=labels, slab_mm=slab_mm)
    if labels is not None and result[2].name != labels:
        raise InputError(
            root, f"the {layout} layout carries the {result[2].name} label set, not {labels}"
        )
    if middle is not None:
        result = _keep_middle(*result, middle)
    return result


def slab_thickness(root: str | Path, layout: str, thickness: float | str | None) -> float | None:
    """The slab thickness a layout is read at (see build_manifest), None for native."""
    if thickness == "auto":
        return CQ500_SLAB_MM if layout == "cq500" else None
    if thickness is None or thickness == "native":
        return None
    value = float(thickness)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"a slab thickness must be a positive number of mm, got {thickness!r}")
    if layout not in SLAB_LAYOUTS:
        raise InputError(
            root,
            f"thickness {value:g} mm: slabs are cut from whole DICOM series (the "
            f"{' and '.join(SLAB_LAYOUTS)} layouts); the {layout} layout is read at its own "
            "slices",
        )
    return value


def _keep_middle(rows: pd.DataFrame, report: AdapterReport, label_set: LabelSet, n: int) -> Adapted:
    """The middle n slices of each scan (all of a shorter one), as preprocess.select picks
    them. Rows keep their slice_index: it is where they lie in the whole scan."""
    by_scan = rows.groupby("scan_id", sort=False)["slice_index"]
    rank = by_scan.rank(method="first").astype(np.int64) - 1
    keep = pd.Series(
        in_middle(rank.to_numpy(), by_scan.transform("size").to_numpy(), n), rows.index
    )
    report.middle_slices = n
    if not keep.all():
        report.notes.append(
            f"kept the middle {n} slice(s) of each scan: {int((~keep).sum())} of {len(rows)} "
            "left out"
        )
    # The rows were normalised when adapted: only the counts change.
    return _counted(rows.loc[keep].reset_index(drop=True), report, label_set)


def write_dataset_manifest(
    root: str | Path, out_parquet: str | Path, **kw: Any
) -> tuple[Path, AdapterReport]:
    """Adapt `root` (keywords as for build_manifest) and write the manifest with its facts."""
    df, report, label_set = build_manifest(root, **kw)
    facts: dict[str, Any] = {**report.facts(), "report": report.to_dict()}
    if report.layout == "images":
        facts["window"] = kw.get("window", DEFAULT_IMAGE_WINDOW)
    return write_manifest(df, out_parquet, label_set, **facts), report


def _finish(rows: pd.DataFrame, report: AdapterReport, label_set: LabelSet) -> Adapted:
    df = normalise(rows, label_set) if len(rows) else empty_manifest(label_set)
    return _counted(df.reset_index(drop=True), report, label_set)


def _counted(df: pd.DataFrame, report: AdapterReport, label_set: LabelSet) -> Adapted:
    report.n_rows = len(df)
    report.n_scans = int(df["scan_id"].nunique())
    report.n_patients = int(df["patient_id"].nunique())
    return df, report, label_set


# --------------------------------------------------------------------------- RSNA


def adapt_rsna(root: str | Path, *, workers: int | None = None) -> Adapted:
    """RSNA 2019 challenge layout: per-slice labels from the long CSV, geometry from the
    DICOM headers. Slices without a label row are reported and left out of the manifest."""
    root = _dataset_root(root)
    csv = next((root / n for n in RSNA_CSVS if (root / n).is_file()), None)
    if csv is None:
        raise InputError(root, f"no RSNA label CSV ({' or '.join(RSNA_CSVS)})")
    report = AdapterReport("rsna", label_level="slice", source=str(root))
    table, report.duplicate_label_rows, problems = read_rsna_labels(csv)
    report.problems += problems

    image_dir = _rsna_image_dir(root, csv)
    if image_dir is None:
        report.problems.append(
            f"{root}: no image folder ({', '.join(RSNA_IMAGE_DIRS)}): "
            f"none of the {len(table)} labelled image(s) has a file"
        )
        report.labels_without_files = table.index.tolist()
        return _finish(pd.DataFrame(), report, RSNA)

    files = _listing(image_dir, ".dcm")
    has_label = files.index.isin(table.index)
    report.files_without_labels = files.loc[~has_label, "path"].tolist()
    missing = ~table.index.isin(files.index)
    report.labels_without_files = table.index[missing].tolist()
    if report.files_without_labels:
        report.problems.append(
            f"{image_dir}: {len(report.files_without_labels)} DICOM file(s) have no row in "
            f"{csv.name} and were left out (first: {report.files_without_labels[0]})"
        )
    if report.labels_without_files:
        report.problems.append(
            f"{csv}: {len(report.labels_without_files)} labelled image(s) have no file in "
            f"{image_dir} (first: {report.labels_without_files[0]})"
        )

    labelled = files.loc[has_label]
    headers, bad = read_header_table(labelled["path"].tolist(), workers=workers)
    report.bad_files = bad
    if bad:
        report.problems.append(
            f"{len(bad)} labelled DICOM file(s) could not be read and were left out "
            f"(first: {bad[0]['path']}: {bad[0]['reason']})"
        )
    headers["stem"] = headers["path"].map(pd.Series(labelled.index, index=labelled["path"]))
    rows = headers.join(table, on="stem")
    rows["kind"] = "dicom"
    rows = _fill_missing_ids(rows, report)
    rows = order_slices(rows, report)
    return _finish(rows, report, RSNA)


def read_rsna_labels(csv: str | Path) -> tuple[pd.DataFrame, int, list[str]]:
    """The long RSNA CSV as one row per image (index: image id, columns: RSNA labels, int8),
    the number of exact duplicate rows dropped, and problem lines.

    The stage-2 CSV has 4.5 million rows, so everything runs in Arrow and numpy kernels:
    no Python per row (pandas' str.rsplit alone would be one)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    csv = Path(csv)
    ids, text = _read_rsna_columns(csv)
    ok = pc.fill_null(pc.is_in(text, value_set=pa.array(["0", "1"])), False)
    _raise_at_first(csv, ok, lambda i: f"Label {text[i].as_py()!r} is not 0 or 1")

    parts = pc.split_pattern(ids, pattern="_", max_splits=1, reverse=True)
    ok = pc.equal(pc.fill_null(pc.list_value_length(parts), 0), 2)
    _raise_at_first(csv, ok, lambda i: _bad_rsna_id(ids[i].as_py()))
    code = pc.index_in(pc.list_element(parts, 1), value_set=pa.array(RSNA.labels))
    _raise_at_first(csv, pc.is_valid(code), lambda i: _bad_rsna_id(ids[i].as_py()))

    encoded = pc.dictionary_encode(pc.list_element(parts, 0)).combine_chunks()
    images = encoded.dictionary.to_numpy(zero_copy_only=False).astype(object)
    n_labels = len(RSNA.labels)
    # One integer per (image, subtype, value): duplicates and conflicts become set algebra.
    cell = encoded.indices.to_numpy().astype(np.int64) * n_labels + _numpy(code)
    value = (_numpy(pc.equal(text, "1"))).astype(np.int64)
    distinct, _ = _sorted_unique(cell * 2 + value)
    duplicates = len(cell) - len(distinct)
    cells, counts = _sorted_unique(distinct // 2)
    grid = np.full(len(images) * n_labels, UNKNOWN, dtype=np.int8)
    grid[distinct // 2] = distinct % 2
    grid[cells[counts > 1]] = UNKNOWN
    grid = grid.reshape(len(images), n_labels)

    problems: list[str] = []
    if duplicates:
        problems.append(f"{csv}: {duplicates} duplicate row(s) dropped")
    conflicting = cells[counts > 1]
    if len(conflicting):
        first = f"{images[conflicting[0] // n_labels]}_{RSNA.labels[conflicting[0] % n_labels]}"
        problems.append(
            f"{csv}: {len(conflicting)} ID(s) appear with both 0 and 1 and are marked unknown "
            f"(-1) (first: {first})"
        )
    present = np.zeros(grid.size, dtype=bool)
    present[cells] = True
    missing = np.flatnonzero(~present)
    if len(missing):
        problems.append(
            f"{csv}: {len(_sorted_unique(missing // n_labels)[0])} image(s) lack a row for some "
            f"subtype; those labels are unknown (-1) (first: {images[missing[0] // n_labels]})"
        )
    table = pd.DataFrame(grid, index=pd.Index(images, name="stem"), columns=list(RSNA.labels))
    return table, duplicates, problems


def _read_rsna_columns(csv: Path) -> tuple[Any, Any]:
    """(ID, Label) as trimmed Arrow strings; header names are matched after stripping."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(csv, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except FileNotFoundError:
        raise InputError(csv, "file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(csv, f"not a readable CSV ({exc})") from None
    names = {name.strip(): name for name in table.column_names}
    if not {"ID", "Label"} <= set(names):
        raise InputError(csv, f"expected columns ID,Label; found {', '.join(names)}")
    ids = pc.utf8_trim_whitespace(table[names["ID"]].cast(pa.string()))
    text = pc.utf8_trim_whitespace(table[names["Label"]].cast(pa.string()))
    return ids, text


def _sorted_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, counts) by one sort. np.unique's hash path (numpy >= 2.3) degrades
    badly on these strided integer keys: 4 s instead of 0.1 s for a million."""
    ordered = np.sort(values, kind="stable")
    if not len(ordered):
        return ordered, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return ordered[starts], np.diff(np.r_[starts, len(ordered)])


def _numpy(array: Any) -> np.ndarray:
    return array.to_numpy() if hasattr(array, "to_numpy") else np.asarray(array)


def _raise_at_first(csv: Path, ok: Any, describe: Callable[[int], str]) -> None:
    """InputError naming the CSV line of the first row where `ok` is false."""
    import pyarrow.compute as pc

    bad = np.flatnonzero(~_numpy(pc.fill_null(ok, False)).astype(bool))
    if len(bad):
        raise InputError(csv, f"line {bad[0] + 2}: {describe(int(bad[0]))}")


def _bad_rsna_id(value: str | None) -> str:
    return f"ID {value!r} is not ID_<image>_<subtype> with a subtype among {', '.join(RSNA.labels)}"


def _rsna_image_dir(root: Path, csv: Path) -> Path | None:
    stage = csv.name.split("_train")[0]  # stage_1 or stage_2: prefer the matching folder
    ordered = sorted(RSNA_IMAGE_DIRS, key=lambda d: not d.startswith(stage))
    return next((root / d for d in ordered if (root / d).is_dir()), None)


def _listing(folder: Path, suffix: str) -> pd.DataFrame:
    """Files in one flat folder with `suffix`, indexed by stem. os.scandir: RSNA has 752k."""
    with os.scandir(folder) as entries:
        paths = sorted(e.path for e in entries if e.name.endswith(suffix) and e.is_file())
    stems = [os.path.basename(p)[: -len(suffix)] for p in paths]
    return pd.DataFrame({"path": paths}, index=pd.Index(stems, name="stem"))


# --------------------------------------------------------------------------- headers


_HEADER_FIELDS = ("path", "image_id", "patient_id", "study_id", "series_id", "instance")
_GEOMETRY = ("px", "py", "pz", "o0", "o1", "o2", "o3", "o4", "o5")


def _read_chunk(paths: list[str]) -> tuple[dict[str, list[Any]], list[dict[str, str]]]:
    """Headers of some files as columns (compact to pickle back from a worker) + the bad."""
    columns: dict[str, list[Any]] = {k: [] for k in (*_HEADER_FIELDS, *_GEOMETRY)}
    bad: list[dict[str, str]] = []
    nan6 = (math.nan,) * 6
    for path in paths:
        try:
            h = read_header(path)
            check_ct_slice(h, path)
        except InputError as exc:
            bad.append({"path": path, "reason": exc.problem})
            continue
        columns["path"].append(path)
        columns["image_id"].append(h.sop_uid)
        columns["patient_id"].append(h.patient_id)
        columns["study_id"].append(h.study_uid)
        columns["series_id"].append(h.series_uid)
        columns["instance"].append(h.instance_number if h.instance_number is not None else -1)
        geometry = (*(h.position or (math.nan,) * 3), *(h.orientation or nan6))
        for key, value in zip(_GEOMETRY, geometry, strict=True):
            columns[key].append(value)
    return columns, bad


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def read_header_table(
    paths: Sequence[str], *, workers: int | None = None
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """DICOM headers of many files as a table (ids, position, orientation), read over a
    process pool in bounded chunks so memory holds only the table, never the datasets."""
    n_workers = min(workers or default_workers(), max(1, len(paths) // HEADER_CHUNK))
    chunks = _chunks(paths, HEADER_CHUNK)
    if n_workers <= 1 or len(paths) < MIN_FILES_FOR_POOL:
        results: Iterable[tuple[dict[str, list[Any]], list[dict[str, str]]]] = map(
            _read_chunk, chunks
        )
        return _collect(results)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(n_workers, mp_context=mp.get_context(method)) as pool:
        return _collect(_bounded_map(pool, _read_chunk, chunks, 4 * n_workers))


def _bounded_map(
    pool: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterator[Any], in_flight: int
) -> Iterator[Any]:
    """pool.map submits everything at once; this keeps at most `in_flight` chunks queued."""
    pending = [pool.submit(fn, item) for item in islice(items, in_flight)]
    while pending:
        done = pending.pop(0)
        nxt = next(items, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield done.result()


def _collect(
    results: Iterable[tuple[dict[str, list[Any]], list[dict[str, str]]]],
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    frames: list[pd.DataFrame] = []
    bad: list[dict[str, str]] = []
    for columns, chunk_bad in results:
        frames.append(pd.DataFrame(columns))
        bad += chunk_bad
    if not frames:
        frames = [pd.DataFrame({k: [] for k in (*_HEADER_FIELDS, *_GEOMETRY)})]
    table = pd.concat(frames, ignore_index=True)
    return table.astype({k: "float64" for k in _GEOMETRY}), bad


def _fill_missing_ids(rows: pd.DataFrame, report: AdapterReport) -> pd.DataFrame:
    """Stand a coarser id in for a missing one, so splits never lump strangers together."""
    for column, fallback in (
        ("series_id", "study_id"),
        ("study_id", "series_id"),
        ("patient_id", "study_id"),
        ("image_id", "stem"),
    ):
        if column not in rows or fallback not in rows:
            continue
        empty = rows[column].fillna("").str.strip() == ""
        if empty.any():
            rows.loc[empty, column] = rows.loc[empty, fallback]
            report.problems.append(
                f"{int(empty.sum())} file(s) have no {column}; used their {fallback} "
                f"(first: {rows.loc[empty, 'path'].iloc[0]})"
            )
    return rows


def order_slices(rows: pd.DataFrame, report: AdapterReport) -> pd.DataFrame:
    """scan_id = series; slices ordered by ImagePositionPatient projected on the plane
    normal (vectorised over every slice), then InstanceNumber where there is no geometry;
    position_mm is measured from the series' first slice."""
    orient = rows[list(_GEOMETRY[3:])].to_numpy()
    normal = np.cross(orient[:, :3], orient[:, 3:])
    with np.errstate(invalid="ignore", divide="ignore"):
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    along = np.einsum("ij,ij->i", rows[list(_GEOMETRY[:3])].to_numpy(), normal)
    rows = rows.assign(scan_id=rows["series_id"], _along=along)
    rows = rows.sort_values(
        ["series_id", "_along", "instance", "image_id"], na_position="last", kind="stable"
    )
    rows["slice_index"] = rows.groupby("series_id", sort=False).cumcount()
    rows["position_mm"] = rows["_along"] - rows.groupby("series_id", sort=False)[
        "_along"
    ].transform("min")
    no_geometry = np.isnan(rows["_along"].to_numpy())
    if no_geometry.any():
        report.problems.append(
            f"{int(no_geometry.sum())} slice(s) have no usable ImagePositionPatient/"
            "ImageOrientationPatient (missing or not finite): ordered by InstanceNumber "
            "after the rest of their series "
            f"(first: {rows.loc[no_geometry, 'path'].iloc[0]})"
        )
    same_series = rows["series_id"].eq(rows["series_id"].shift())
    repeated = same_series & (rows["_along"].diff().abs() < 1e-3)
    if repeated.any():
        report.problems.append(
            f"{int(repeated.sum())} slice(s) share a position with another slice of their "
            "series; kept, since each carries its own labels "
            f"(first: {rows.loc[repeated, 'path'].iloc[0]})"
        )
    return rows.drop(columns=["_along"])


# --------------------------------------------------------------------------- CQ500


def read_cq500_reads(csv: str | Path, *, problems: list[str] | None = None) -> pd.DataFrame:
    """One row per scan: name, category, the majority of each finding among the readers who
    answered (2 of 3, or 2 of 2) as the CQ500 labels (int8; -1 when those who answered do
    not reach one: 1 of 2, or a single answer), the number of readers voting for it
    (`votes_<label>`), and each reader's agreement with the majority over the findings both
    have (`r1_agreement`...). A blank or -1 cell is a reader who did not answer; blanks and
    findings left without a majority are appended to `problems`, with counts."""
    csv = Path(csv)
    raw = _read_csv(csv, dtype=str, keep_default_na=False)
    raw.columns = raw.columns.str.strip()
    needed = ["name"] + [f"{r}:{c}" for r in CQ500_READERS for c in CQ500_COLUMNS]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise InputError(csv, f"missing column(s) {', '.join(missing)}")
    names = raw["name"].str.strip()
    reads = np.stack(
        [
            np.stack(
                [
                    _parse_binary(raw[f"{r}:{c}"], csv, f"{r}:{c}", raw.index, names=names)
                    for c in CQ500_COLUMNS
                ],
                axis=1,
            )
            for r in CQ500_READERS
        ],
        axis=1,
    )  # [scan, reader, finding]
    votes = (reads == 1).sum(axis=1)
    against = (reads == 0).sum(axis=1)
    majority = np.where(votes >= 2, 1, np.where(against >= 2, 0, UNKNOWN)).astype(np.int8)
    if problems is not None:
        problems += _cq500_read_problems(csv, names, reads, majority)
    out = pd.DataFrame({"name": names})
    if "Category" in raw.columns:
        out["category"] = raw["Category"].str.strip()
    out[list(CQ500.labels)] = majority
    out[[f"votes_{label}" for label in CQ500.labels]] = votes.astype(np.int8)
    known = majority != UNKNOWN
    for i, reader in enumerate(CQ500_READERS):
        both = known & (reads[:, i, :] != UNKNOWN)
        agree = (both & (reads[:, i, :] == majority)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"{reader.lower()}_agreement"] = agree / both.sum(axis=1)
    return out


def _cq500_read_problems(
    csv: Path, names: pd.Series, reads: np.ndarray, majority: np.ndarray
) -> list[str]:
    """Blank reader cells and the findings they leave without a majority, counted and the
    first named (scan, reader:finding)."""
    out: list[str] = []
    blank = np.argwhere(reads == UNKNOWN)
    if len(blank):
        scan, reader, finding = blank[0]
        out.append(
            f"{csv}: {len(blank)} blank reader cell(s), read as no answer: the majority is "
            f"taken among the readers who answered (first: {names.iloc[scan]} "
            f"{CQ500_READERS[reader]}:{CQ500_COLUMNS[finding]})"
        )
    tied = np.argwhere(majority == UNKNOWN)
    if len(tied):
        scan, finding = tied[0]
        answers = reads[scan, :, finding]
        out.append(
            f"{csv}: {len(tied)} finding(s) have no majority among the readers who answered "
            f"and are unknown (-1) (first: {names.iloc[scan]} {CQ500_COLUMNS[finding]}: "
            f"{int((answers == 1).sum())} of {int((answers != UNKNOWN).sum())} positive)"
        )
    return out


def cq500_number(names: pd.Series) -> pd.Series:
    """The patient number in 'CQ500-CT-427' or a folder 'CQ500CT427 CQ500CT427' (NA if none)."""
    return names.astype(str).str.extract(_NUMBER, expand=False).astype("Int64")


def adapt_cq500(
    root: str | Path, *, workers: int | None = None, slab_mm: float | None = None
) -> Adapted:
    """CQ500: majority reads as scan-level labels on every slice of each patient's chosen
    series, or on every slab of it (`slab_mm`, see `slab_rows`). A patient is a folder, or
    the CQ500-CT-<n>.zip it is distributed as (read in place; a folder of the same patient
    wins). Reads without a patient are reported (with only reads.csv, the manifest is empty
    and the report says how many reads have no images)."""
    root = _dataset_root(root)
    csv = root / CQ500_READS
    report = AdapterReport("cq500", label_level="scan", source=str(root), slab_mm=slab_mm)
    reads = read_cq500_reads(csv, problems=report.problems)
    reads = _dedupe_reads(reads.assign(number=lambda d: cq500_number(d["name"])), csv, report)
    folders = _cq500_patient_entries(root, report)
    twice = folders.duplicated("number")
    if twice.any():
        report.problems.append(
            f"{int(twice.sum())} folder(s) repeat the number of another patient folder and "
            f"were left out (first: {folders.loc[twice, 'folder'].iloc[0]})"
        )
        report.files_without_labels += folders.loc[twice, "folder"].map(str).tolist()
        folders = folders.loc[~twice]
    matched = reads.merge(folders, on="number", how="outer", indicator=True)
    no_folder = matched["_merge"] == "left_only"
    no_read = matched["_merge"] == "right_only"
    report.labels_without_files = matched.loc[no_folder, "name"].tolist()
    report.files_without_labels += matched.loc[no_read, "folder"].map(str).tolist()
    if no_folder.any():
        report.problems.append(
            f"{csv}: {int(no_folder.sum())} read(s) have no patient folder (or "
            f"CQ500-CT-<n>.zip) under {root}"
            + (": the manifest is empty" if not (matched["_merge"] == "both").any() else "")
        )
    if no_read.any():
        report.problems.append(
            f"{int(no_read.sum())} patient folder(s) have no row in {csv.name} and were left "
            f"out (first: {matched.loc[no_read, 'folder'].iloc[0]})"
        )
    both = matched.loc[matched["_merge"] == "both"].reset_index(drop=True)
    frames: list[pd.DataFrame] = []
    results = _map_patients(both["folder"].tolist(), workers, slab_mm)
    for i, (rows, bad, problems, notes) in enumerate(results):
        report.bad_files += bad
        report.problems += problems
        report.notes += notes
        if rows is None:
            report.labels_without_files.append(both.at[i, "name"])
            continue
        labels = both.loc[i, list(CQ500.labels)].astype(np.int8).to_dict()
        frames.append(rows.assign(patient_id=both.at[i, "name"], **labels))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _note_slabs(rows, report)
    return _finish(rows, report, CQ500)


def _cq500_patient_entries(root: Path, report: AdapterReport) -> pd.DataFrame:
    """Patient folders and zips under the root, with their CQ500 number; what does not look
    like a patient is reported. A zip whose patient also has a folder (unzipped beside it)
    is left for the folder, with a note."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    zips = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".zip")
    entries = pd.DataFrame({"folder": pd.Series([*dirs, *zips], dtype=object)})
    entries["number"] = cq500_number(pd.Series([p.name for p in entries["folder"]], dtype=object))
    unnamed = entries["number"].isna()
    if unnamed.any():
        report.problems.append(
            f"{int(unnamed.sum())} folder(s) or zip(s) do not look like a CQ500 patient "
            f"(CQ500CT<n>) and were ignored (first: {entries.loc[unnamed, 'folder'].iloc[0]})"
        )
    entries = entries.loc[~unnamed]
    is_zip = entries["folder"].map(lambda p: p.is_file())
    unzipped = is_zip & entries["number"].isin(entries.loc[~is_zip, "number"])
    if unzipped.any():
        report.notes.append(
            f"{int(unzipped.sum())} patient zip(s) have a folder of the same patient beside "
            f"them; the folders were read (first: {entries.loc[unzipped, 'folder'].iloc[0]})"
        )
    return entries.loc[~unzipped].reset_index(drop=True)


def _note_slabs(rows: pd.DataFrame, report: AdapterReport) -> None:
    if report.slab_mm is None or rows.empty:
        return
    scans = rows.groupby("scan_id", sort=False)["kind"].first()
    slabbed = int((scans == "series").sum())
    report.notes.append(
        f"{slabbed} of {len(scans)} chosen series read as {report.slab_mm:g} mm slabs along "
        "the slice normal (tilt corrected); the rest are no thinner and keep their slices"
    )


def _dedupe_reads(reads: pd.DataFrame, csv: Path, report: AdapterReport) -> pd.DataFrame:
    n = len(reads)
    reads = reads.drop_duplicates()
    report.duplicate_label_rows = n - len(reads)
    if report.duplicate_label_rows:
        report.problems.append(f"{csv}: {report.duplicate_label_rows} duplicate row(s) dropped")
    conflicting = reads.duplicated("name", keep=False)
    if conflicting.any():
        names = reads.loc[conflicting, "name"].drop_duplicates()
        raise InputError(
            csv, f"{len(names)} scan(s) appear twice with different reads (first: {names.iloc[0]})"
        )
    no_number = reads["number"].isna()
    if no_number.any():
        report.problems.append(
            f"{csv}: {int(no_number.sum())} name(s) are not like CQ500-CT-<n> and cannot be "
            f"matched to a folder (first: {reads.loc[no_number, 'name'].iloc[0]})"
        )
    return reads


# (rows or None, bad files, problems, notes) for one CQ500 patient folder.
PatientResult = tuple[pd.DataFrame | None, list[dict[str, str]], list[str], list[str]]


def _map_patients(
    folders: list[Path], workers: int | None, slab_mm: float | None = None
) -> Iterator[PatientResult]:
    n_workers = min(workers or default_workers(), len(folders))
    read = functools.partial(_cq500_patient, slab_mm=slab_mm)
    if n_workers <= 1:
        yield from map(read, folders)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(n_workers, mp_context=mp.get_context(method)) as pool:
        yield from _bounded_map(pool, read, iter(folders), 2 * n_workers)


def _cq500_patient(folder: Path, slab_mm: float | None = None) -> PatientResult:
    """The rows of one patient's chosen series (labels added by the caller): its slices,
    or its slabs when `slab_mm` is given and the series is thinner."""
    try:
        found = discover(folder)
    except InputError as exc:
        return None, [], [f"{folder}: {exc.problem}; its read has no images"], []
    bad = [{"path": b.path, "reason": b.reason} for b in found.bad_files]
    best = _best_series(found)
    if best is None:
        return None, bad, [f"{folder}: no readable CT series; its read has no images"], []
    problems = [f"{folder}: series {best.series_uid}: {p}" for p in best.problems]
    others = len(found.series) - 1
    notes = (
        [
            f"{folder}: chose {best.description or best.series_uid} "
            f"({best.selection_reason.split(';')[0]}) over {others} other series"
        ]
        if others
        else []
    )
    rows, problem, _ = rows_at_thickness(best, slab_mm)
    if problem:
        problems.append(f"{folder}: series {best.series_uid}: {problem}")
    return rows, bad, problems, notes


def _best_series(found: Discovery) -> Series | None:
    chosen = [s for s in found.series if s.selected]
    return max(chosen, key=selection_key) if chosen else None


def series_rows(series: Series) -> pd.DataFrame:
    """One manifest row per slice of a discovered series, in spatial order."""
    headers = series.headers
    return pd.DataFrame(
        {
            "path": [h.path for h in headers],
            "member": [h.member or "" for h in headers],
            "kind": "dicom",
            "image_id": [h.sop_uid for h in headers],
            # No PatientID: the study stands in, so splits never lump strangers together.
            "patient_id": series.patient_id or series.study_uid,
            "study_id": series.study_uid,
            "series_id": series.series_uid,
            "scan_id": series.series_uid,
            "slice_index": np.arange(len(headers), dtype=np.int32),
            "position_mm": np.asarray(series.positions_mm, dtype=np.float64),
        }
    )


def rows_at_thickness(
    series: Series, slab_mm: float | None
) -> tuple[pd.DataFrame, str, np.ndarray | None]:
    """The series' slab rows when `slab_mm` is given and the series is thinner, else its
    slice rows; a problem line when it could not be cut into slabs (then its slices); and
    the slab each slice is averaged into, as `slab_rows` gives it (None for slice rows)."""
    if slab_mm is None or not is_thinner(series.slice_spacing_mm, slab_mm):
        return series_rows(series), "", None
    try:
        rows, slab_of = slab_rows(series, slab_mm)
        return rows, "", slab_of
    except ValueError as exc:
        problem = f"cannot be cut into {slab_mm:g} mm slabs ({exc}); kept whole"
        return series_rows(series), problem, None


def slab_rows(series: Series, slab_mm: float) -> tuple[pd.DataFrame, np.ndarray | None]:
    """One `series` row per slab of the series resliced to `slab_mm` (what
    preprocess.reslice makes of it: slabs along the slice normal, tilt corrected, each the
    mean of the slices within it). `path` is where the series lies (its folder, or its
    zip), `member` its SeriesInstanceUID, `slice_index` the slab: prepare reads the series
    once per run of its rows and reslices it. The slab count comes from the headers; also
    the slab each slice (in header order) is averaged into, None when interpolated."""
    n, slab_of = slab_plan(series.positions_mm, slab_mm)
    uid = series.series_uid
    return pd.DataFrame(
        {
            "path": series_source(series),
            "member": uid,
            "kind": "series",
            "image_id": [f"{uid}-slab-{j:03d}" for j in range(n)],
            "patient_id": series.patient_id or series.study_uid,
            "study_id": series.study_uid,
            "series_id": uid,
            "scan_id": uid,
            "slice_index": np.arange(n, dtype=np.int32),
            "position_mm": np.arange(n, dtype=np.float64) * slab_mm,
        }
    ), slab_of


def series_source(series: Series) -> str:
    """The zip or the folder that holds every file of the series (discover reads it back)."""
    paths = {h.path for h in series.headers}
    if len(paths) == 1 and series.first.member is not None:
        return series.first.path
    return os.path.commonpath([os.path.dirname(p) or "." for p in paths])


# --------------------------------------------------------------------------- plain DICOM


def adapt_dicom(
    root: str | Path, *, labels: str | None = None, slab_mm: float | None = None
) -> Adapted:
    """A folder of DICOM: every slice of each study's chosen series (or every slab of it,
    `slab_mm` as in adapt_cq500). Labels are -1 (for prediction-only manifests) unless a
    `slice_truth.csv` (sop_uid + label columns, as `ichscan synth` writes) gives per-slice
    labels; a slab then gets those of its slices (positive when one is, unknown when one is
    and none is positive). Series not chosen are counted."""
    root = _dataset_root(root)
    truth_csv = root / SLICE_TRUTH_CSV
    truth = None
    if truth_csv.is_file():
        truth = read_label_table(
            truth_csv, labels, id_column="sop_uid", known_columns=SLICE_TRUTH_EXTRA
        )
    label_set = truth.label_set if truth else get_label_set(labels or RSNA.name)
    report = AdapterReport("dicom", label_level="slice", source=str(root), slab_mm=slab_mm)
    found = discover(root)
    report.bad_files = [{"path": b.path, "reason": b.reason} for b in found.bad_files]
    if found.bad_files:
        first = found.bad_files[0]
        report.problems.append(f"{len(found.bad_files)} file(s) could not be used (first: {first})")
    frames, slices = [], []
    for s in found.series:
        if s.selected:
            rows, problem, slab_of = rows_at_thickness(s, slab_mm)
            frames.append(rows)
            if truth is not None:  # slice rows only to carry slice_truth.csv onto slabs
                slices.append(_slices_with_slabs(s, slab_of))
            report.problems += [f"series {s.series_uid}: {p}" for p in s.problems]
            if problem:
                report.problems.append(f"series {s.series_uid}: {problem}")
        else:
            report.notes.append(
                f"series {s.series_uid} ({s.n_slices} slice(s), {s.first.path}) left out: "
                f"{s.selection_reason}"
            )
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if truth is None or rows.empty:
        for label in label_set.labels:
            rows[label] = UNKNOWN
    else:
        labelled = _join_slice_truth(pd.concat(slices, ignore_index=True), truth, report)
        rows = _labels_per_row(rows, labelled, list(label_set.labels))
    _note_slabs(rows, report)
    return _finish(rows, report, label_set)


def _slices_with_slabs(series: Series, slab_of: np.ndarray | None) -> pd.DataFrame:
    """The series' slice rows, each with the slab it is averaged into (-1: none)."""
    slices = series_rows(series)
    return slices.assign(slab=np.full(len(slices), -1, np.int64) if slab_of is None else slab_of)


def _labels_per_row(rows: pd.DataFrame, slices: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Slice labels onto the manifest rows, in their order: as they are for slice rows,
    merged per slab for `series` rows (see adapt_dicom). ``slices``: the slice rows with
    their labels and slab (see `_slices_with_slabs`)."""
    is_slab = (rows["kind"] == "series").to_numpy()
    if not is_slab.any():
        return slices.drop(columns="slab")
    values = np.full((len(rows), len(labels)), UNKNOWN, dtype=np.int8)
    native = slices[["image_id", *labels]].drop_duplicates("image_id")
    found = rows.loc[~is_slab, ["image_id"]].merge(native, on="image_id", how="left")
    values[~is_slab] = found[labels].fillna(UNKNOWN).to_numpy()
    slabbed = slices.loc[slices["scan_id"].isin(set(rows.loc[is_slab, "scan_id"]))]
    per_slab = _slab_labels(slabbed, labels)
    found = rows.loc[is_slab, ["scan_id", "slice_index"]].merge(
        per_slab, on=["scan_id", "slice_index"], how="left"
    )
    values[is_slab] = found[labels].fillna(UNKNOWN).to_numpy()
    return rows.assign(**{label: values[:, j] for j, label in enumerate(labels)})


def _slab_labels(slices: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Per (scan, slab): 1 if a slice in it is positive, else -1 if one is unknown, else 0.
    A slab that holds no slice (interpolated across a gap) gets no row: unknown."""
    frames = []
    for scan, group in slices.groupby("scan_id", sort=False):
        slab = group["slab"].to_numpy()
        if (slab < 0).any():
            continue  # interpolated, not averaged: no slice lies in one slab
        by_slab = group[labels].groupby(slab)
        most = by_slab.max()
        merged = np.where(most == 1, 1, np.where(by_slab.min() == UNKNOWN, UNKNOWN, 0))
        frame = pd.DataFrame(merged, columns=labels)
        frames.append(frame.assign(scan_id=scan, slice_index=most.index.to_numpy()))
    columns = ["scan_id", "slice_index", *labels]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def _join_slice_truth(rows: pd.DataFrame, truth: LabelTable, report: AdapterReport) -> pd.DataFrame:
    """Per-slice labels by SOP Instance UID; slices without a truth row stay unknown (-1)."""
    report.duplicate_label_rows = truth.duplicates
    report.problems += truth.problems
    table = truth.table.drop(columns=["patient_id"], errors="ignore").set_index("id")
    rows = rows.join(table, on="image_id")
    labels = list(truth.label_set.labels)
    unlabelled = rows[labels[0]].isna()
    if unlabelled.any():
        report.problems.append(
            f"{truth.csv}: {int(unlabelled.sum())} slice(s) have no row; their labels are "
            f"unknown (-1) (first: {rows.loc[unlabelled, 'path'].iloc[0]})"
        )
        report.files_without_labels += rows.loc[unlabelled, "path"].tolist()
    rows[labels] = rows[labels].fillna(UNKNOWN).astype(np.int8)
    # Truth rows of series not chosen (or not found) have no slice in the manifest.
    orphans = table.index[~table.index.isin(rows["image_id"])]
    if len(orphans):
        report.labels_without_files += orphans.tolist()
        report.problems.append(
            f"{truth.csv}: {len(orphans)} row(s) name no slice of a chosen series "
            f"(first: {orphans[0]})"
        )
    return rows


# --------------------------------------------------------------------------- label tables


@dataclass
class LabelTable:
    """A labels.csv read and checked: one row per id (str), int8 label columns."""

    csv: Path
    label_set: LabelSet
    table: pd.DataFrame  # columns: id, [patient_id], *labels
    duplicates: int
    problems: list[str]


def read_label_table(
    csv: str | Path,
    labels: str | None = None,
    *,
    id_column: str | None = None,
    known_columns: Sequence[str] = (),
) -> LabelTable:
    """labels.csv with an id column and label columns. Column names are stripped and matched
    case-insensitively (the Kaggle head_ct header is `id, hemorrhage`); ids are kept as text
    (so 000 stays 000) with any image/volume suffix removed; values must be 0, 1, -1 or empty
    (empty = unknown, -1). `id_column` names the id column (else the first of ID_COLUMNS);
    `known_columns` are expected extra columns, ignored without a remark."""
    csv = Path(csv)
    raw = _read_csv(csv, dtype=str, keep_default_na=False)
    raw.columns = raw.columns.str.strip()
    lower = {c.lower(): c for c in raw.columns}
    wanted = (id_column.lower(),) if id_column else ID_COLUMNS
    id_column = next((lower[c] for c in wanted if c in lower), None)
    if id_column is None:
        raise InputError(csv, f"no id column ({', '.join(wanted)}); found {', '.join(raw.columns)}")
    others = [c for c in raw.columns if c != id_column and c not in known_columns]
    if labels is not None:
        label_set = get_label_set(labels)
    else:
        try:
            label_set = detect_label_set(others)
        except ValueError as exc:
            raise InputError(csv, str(exc)) from None
    columns = _label_columns(csv, label_set, lower)
    table = pd.DataFrame(
        {"id": raw[id_column].str.strip().str.replace(_KNOWN_SUFFIX, "", regex=True)}
    )
    patient_column = next((lower[c] for c in PATIENT_COLUMNS if c in lower), None)
    if patient_column is not None:
        table["patient_id"] = raw[patient_column].str.strip()
    problems: list[str] = []
    blank_ids = table["id"] == ""
    if blank_ids.any():
        raise InputError(csv, f"line {int(raw.index[blank_ids][0]) + 2}: empty id")
    for label, column in columns.items():
        table[label] = _parse_binary(raw[column], csv, column, raw.index, names=table["id"])
    unknown = int((table[list(label_set.labels)] == UNKNOWN).to_numpy().sum())
    if unknown:
        problems.append(f"{csv}: {unknown} empty or -1 label value(s), kept as unknown (-1)")
    ignored = [c for c in others if c not in columns.values() and c != patient_column]
    ignored = [c for c in ignored if c.lower() not in {k.lower() for k in known_columns}]
    if ignored:
        problems.append(f"{csv}: column(s) {', '.join(ignored)} are not {label_set.name} labels")
    table, duplicates = _dedupe_ids(table, csv, list(label_set.labels), problems)
    return LabelTable(csv, label_set, table, duplicates, problems)


def _label_columns(csv: Path, label_set: LabelSet, lower: dict[str, str]) -> dict[str, str]:
    columns = {label: lower[label] for label in label_set.labels if label in lower}
    if label_set.labels == ("hemorrhage",) and not columns and "label" in lower:
        columns["hemorrhage"] = lower["label"]
    missing = [label for label in label_set.labels if label not in columns]
    if missing:
        raise InputError(csv, f"missing {label_set.name} label column(s) {', '.join(missing)}")
    return columns


def _dedupe_ids(
    table: pd.DataFrame, csv: Path, labels: list[str], problems: list[str]
) -> tuple[pd.DataFrame, int]:
    """Drop exact duplicate rows (counted); an id with conflicting labels gets -1 (reported)."""
    n = len(table)
    table = table.drop_duplicates()
    duplicates = n - len(table)
    if duplicates:
        problems.append(f"{csv}: {duplicates} duplicate row(s) dropped")
    conflicting = table.duplicated("id", keep=False)
    if conflicting.any():
        ids = table.loc[conflicting, "id"].drop_duplicates()
        problems.append(
            f"{csv}: {len(ids)} id(s) appear with different labels and are marked unknown "
            f"(-1) (first: {ids.iloc[0]})"
        )
        table.loc[conflicting, labels] = UNKNOWN
        table = table.drop_duplicates("id")
    return table.reset_index(drop=True), duplicates


def match_files(
    ids: pd.Series, files: pd.DataFrame, problems: list[str]
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Join label ids to file stems: as text first, then as integers for ids that lost their
    zero padding (`1` -> `001.png`). Returns (path per label row or NA, the label ids without
    a file, the file paths without a label)."""
    by_stem = files.drop_duplicates("stem").set_index("stem")["path"]
    path = ids.map(by_stem)
    unmatched_files = ~files["stem"].isin(ids)
    numeric_ids = path.isna() & ids.str.fullmatch(r"\d+")
    spare = files.loc[unmatched_files & files["stem"].str.fullmatch(r"\d+")]
    if numeric_ids.any() and len(spare):
        spare_by_int = spare.assign(n=spare["stem"].astype(np.int64))
        clashes = spare_by_int.duplicated("n", keep="first")
        if clashes.any():
            problems.append(
                f"{int(clashes.sum())} file(s) have the same number as another "
                f"(first: {spare_by_int.loc[clashes, 'path'].iloc[0]}); the first was used"
            )
        spare_by_int = spare_by_int.loc[~clashes].set_index("n")["path"]
        by_int = ids[numeric_ids].astype(np.int64).map(spare_by_int)
        path[numeric_ids] = by_int
        unmatched_files &= ~files["path"].isin(by_int.dropna())
    return path, ids[path.isna()], files.loc[unmatched_files, "path"]


# --------------------------------------------------------------------------- image folder


def adapt_images(
    root: str | Path, labels: str | None = None, *, window: str = DEFAULT_IMAGE_WINDOW
) -> Adapted:
    """`images/` (PNG/JPEG, any depth) + `labels.csv`: one row per labelled image; the pixels
    are display values in `window` (brain for the public sets). No patient information
    exists in these sets, so each image is its own patient unless labels.csv has a
    patient_id column."""
    root = _dataset_root(root)
    csv = root / LABELS_CSV
    if not csv.is_file():
        raise InputError(root, f"no {LABELS_CSV} beside the images")
    image_dir = _image_dir(root)
    if image_dir is None:
        raise InputError(root, f"no {IMAGES_DIR}/ folder and no PNG/JPEG files")
    read = read_label_table(csv, labels)
    report = AdapterReport(
        "images",
        label_level="slice",
        source=str(root),
        duplicate_label_rows=read.duplicates,
        problems=list(read.problems),
    )
    paths = [p for p in iter_files(image_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    files = pd.DataFrame({"path": [str(p) for p in paths], "stem": [p.stem for p in paths]})
    _report_duplicate_stems(files, report)
    table = read.table
    table["path"], no_file, no_label = match_files(table["id"], files, report.problems)
    _report_unmatched(report, csv, image_dir, no_file, no_label, "image")
    rows = table.loc[table["path"].notna()].rename(columns={"id": "image_id"})
    rows["image_id"] = rows["path"].map(files.set_index("path")["stem"])
    if "patient_id" not in rows:
        rows["patient_id"] = rows["image_id"]
    rows = rows.assign(kind="image", window=window, scan_id=rows["image_id"])
    return _finish(rows, report, read.label_set)


def _report_duplicate_stems(files: pd.DataFrame, report: AdapterReport) -> None:
    repeated = files.duplicated("stem", keep="first")
    if repeated.any():
        report.problems.append(
            f"{int(repeated.sum())} file(s) share a name with another in a different folder "
            f"and were left out (first: {files.loc[repeated, 'path'].iloc[0]})"
        )
        report.files_without_labels += files.loc[repeated, "path"].tolist()


def _report_unmatched(
    report: AdapterReport,
    csv: Path,
    folder: Path,
    no_file: pd.Series,
    no_label: pd.Series,
    what: str,
) -> None:
    report.labels_without_files += no_file.tolist()
    report.files_without_labels += no_label.tolist()
    if len(no_file):
        report.problems.append(
            f"{csv}: {len(no_file)} id(s) have no {what} file in {folder} "
            f"(first: {no_file.iloc[0]})"
        )
    if len(no_label):
        report.problems.append(
            f"{folder}: {len(no_label)} {what} file(s) have no row in {csv.name} and were "
            f"left out (first: {no_label.iloc[0]})"
        )


# --------------------------------------------------------------------------- NIfTI


def adapt_nifti(
    root: str | Path, labels: str | None = None, *, masks: bool | None = None
) -> Adapted:
    """NIfTI volumes (+ labels.csv with scan-level labels): one row per slice, reading only
    the headers. Slices run along the volume's superior axis, as `read_nifti` orders them.
    `<stem>_mask.nii[.gz]` files are masks, not scans; with `masks=True` each slice's labels
    come from its scan's mask instead (see `mask_slice_labels`) and the level is "slice".
    `masks=None`: from the masks when every volume has one and the label set is one they
    can give (rsna, binary), else labels.csv's per scan."""
    root = _dataset_root(root)
    report = AdapterReport("nifti", source=str(root))
    all_files = list(_nifti_files(root))
    mask_files = {
        _nifti_stem(p)[: -len("_mask")]: p
        for p in all_files
        if _nifti_stem(p).lower().endswith("_mask")
    }
    volumes = [p for p in all_files if p not in set(mask_files.values())]
    files = pd.DataFrame({"path": [str(p) for p in volumes], "stem": map(_nifti_stem, volumes)})
    _report_duplicate_stems(files, report)
    csv = root / LABELS_CSV
    if csv.is_file():
        read = read_label_table(csv, labels)
        label_set = read.label_set
        report.duplicate_label_rows = read.duplicates
        report.problems += read.problems
        table = read.table
        table["path"], no_file, no_label = match_files(table["id"], files, report.problems)
        _report_unmatched(report, csv, root, no_file, no_label, "NIfTI")
        table = table.loc[table["path"].notna()]
    else:
        label_set = get_label_set(labels or RSNA.name)
        table = files.drop_duplicates("stem").rename(columns={"stem": "id"})
    if masks is None:
        masks = _masks_apply(files["stem"], mask_files, label_set, report)
    elif mask_files and not masks:
        report.notes.append(
            f"{len(mask_files)} *_mask NIfTI file(s) are masks, not scans, and were skipped "
            f"(first: {next(iter(mask_files.values()))})"
        )
    report.label_level = "slice" if masks else "scan"
    if not csv.is_file() and not masks:
        report.problems.append(f"{root}: no {LABELS_CSV}: every label is unknown (-1)")
    rows = _nifti_rows(table, report)
    if masks and len(rows):
        rows = _labels_from_masks(rows, mask_files, label_set, report)
    return _finish(rows, report, label_set)


def _masks_apply(
    stems: pd.Series, mask_files: dict[str, Path], label_set: LabelSet, report: AdapterReport
) -> bool:
    """Whether slice labels come from the masks by default, with a note saying which way
    and why: every volume needs its mask, or slices without one would be unknown."""
    if not mask_files:
        return False
    have = int(stems.isin(list(mask_files)).sum())
    first = next(iter(mask_files.values()))
    if have == len(stems) and label_set.labels in MASK_LABELS:
        report.notes.append(
            f"slice labels from the {len(mask_files)} *_mask label map(s), one per volume "
            f"(first: {first}); labels per scan instead: --no-masks"
        )
        return True
    why = (
        f"{have} of {len(stems)} volume(s) have a *_mask, and slice labels need one for "
        "every volume"
        if have < len(stems)
        else f"masks give rsna or binary labels, not {label_set.name}"
    )
    report.notes.append(
        f"{len(mask_files)} *_mask NIfTI file(s) are masks, not scans, and were skipped "
        f"(first: {first}): {why}; labels are per scan"
    )
    return False


def mask_slice_labels(mask: str | Path, label_set: LabelSet) -> np.ndarray:
    """[slice, label] int8 from a label map on the volume's grid, slices ordered as
    `read_nifti` orders them. Any non-zero voxel makes a slice positive for `any` /
    `hemorrhage`; for the RSNA set, value v in 1..5 marks the v-th subtype (the label map
    `ichscan synth` writes)."""
    import nibabel as nib

    if label_set.labels not in MASK_LABELS:
        raise InputError(mask, "slice labels from masks need the rsna or binary label set")
    img = open_nifti(mask)  # read_nifti's header checks: a mask bomb is refused unread
    try:
        data = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    except MemoryError:
        raise InputError(mask, "not enough memory to read the NIfTI mask") from None
    except Exception as exc:
        raise InputError(mask, f"not a readable NIfTI mask ({one_line(exc)})") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.dtype.kind == "f":  # NaN or infinite in a mask: no label there
        data = np.where(np.isfinite(data), data, 0)
    values = np.rint(data).astype(np.int64)
    present = [(values != 0).any(axis=(0, 1))]
    if label_set.labels == RSNA.labels:
        present += [(values == v).any(axis=(0, 1)) for v in range(1, len(RSNA.labels))]
    return np.stack(present, axis=1).astype(np.int8)


def _labels_from_masks(
    rows: pd.DataFrame, mask_files: dict[str, Path], label_set: LabelSet, report: AdapterReport
) -> pd.DataFrame:
    labels = list(label_set.labels)
    rows[labels] = UNKNOWN
    for scan, index in rows.groupby("scan_id").groups.items():
        mask = mask_files.get(str(scan))
        if mask is None:
            report.problems.append(f"{scan}: no {scan}_mask NIfTI; its slice labels are unknown")
            continue
        try:
            per_slice = mask_slice_labels(mask, label_set)
        except Exception as exc:  # InputError, or whatever nibabel raises on one mask
            problem = exc.problem if isinstance(exc, InputError) else one_line(exc)
            report.bad_files.append({"path": str(mask), "reason": problem})
            report.problems.append(f"{mask}: {problem}; the slice labels of {scan} are unknown")
            continue
        if len(per_slice) != len(index):
            report.problems.append(
                f"{mask}: {len(per_slice)} slices, its volume has {len(index)}; "
                f"the slice labels of {scan} are unknown"
            )
            continue
        rows.loc[index, labels] = per_slice[rows.loc[index, "slice_index"].to_numpy()]
    return rows


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".gz")][: -len(".nii")] if name.lower().endswith(".gz") else path.stem


def nifti_slices(path: str | Path) -> tuple[int, float]:
    """(slice count, slice spacing) along the superior axis. The header gets read_nifti's
    checks (one 3-D volume, size, voxel type, affine), and a volume of NaN alone is refused
    (reading planes until one holds a number: one plane for a real scan). InputError when
    read_nifti would refuse the volume."""
    import nibabel as nib

    img = open_nifti(path, keep_file_open=True)  # a .nii.gz is decompressed once
    has_a_number(img, path)
    ornt = nib.io_orientation(img.affine)
    axes = np.flatnonzero(ornt[:, 0] == 2)
    if np.isnan(ornt).any() or len(axes) != 1:
        raise InputError(path, "cannot orient the volume from its affine (no clear superior axis)")
    axis = int(axes[0])
    return int(img.shape[axis]), float(img.header.get_zooms()[axis])


def _nifti_rows(table: pd.DataFrame, report: AdapterReport) -> pd.DataFrame:
    counts, spacing, keep = [], [], []
    for path in table["path"]:
        try:
            n, dz = nifti_slices(path)
        except InputError as exc:
            report.bad_files.append({"path": str(path), "reason": exc.problem})
            keep.append(False)
            continue
        except Exception as exc:  # whatever nibabel raises on one file: that file is bad
            reason = f"cannot read the NIfTI header ({one_line(exc)})"
            report.bad_files.append({"path": str(path), "reason": reason})
            keep.append(False)
            continue
        counts.append(n)
        spacing.append(dz)
        keep.append(True)
    if not all(keep):
        report.problems.append(
            f"{keep.count(False)} NIfTI file(s) could not be read and were left out "
            f"(first: {report.bad_files[0]['path']}: {report.bad_files[0]['reason']})"
        )
    scans = table.loc[keep].reset_index(drop=True)
    if not len(scans):
        return pd.DataFrame()
    scans["stem"] = [_nifti_stem(Path(p)) for p in scans["path"]]  # per volume, not slice
    repeat = np.asarray(counts)
    rows = scans.loc[scans.index.repeat(repeat)].reset_index(drop=True)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(repeat) - repeat, repeat)
    stems = rows.pop("stem")
    if "patient_id" not in rows:
        rows["patient_id"] = stems
    rows = rows.drop(columns=["id"])
    return rows.assign(
        kind="nifti",
        # The slice ids read_nifti gives, so predictions and manifest rows line up.
        image_id=stems + "-" + pd.Series(k).astype(str).str.zfill(4),
        study_id=stems,
        series_id=stems,
        scan_id=stems,
        slice_index=k,
        position_mm=k * np.repeat(spacing, repeat),
    )


# --------------------------------------------------------------------------- parsing


def _read_csv(csv: Path, **kw: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(csv, **kw)
    except FileNotFoundError:
        raise InputError(csv, "file not found") from None
    except pd.errors.EmptyDataError:
        raise InputError(csv, "empty CSV (no header)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(csv, f"not a readable CSV ({exc})") from None


def _parse_binary(
    values: pd.Series,
    csv: Path,
    column: str,
    index: pd.Index,
    *,
    names: pd.Series | None = None,
    allow_unknown: bool = True,
) -> np.ndarray:
    """Text cells → int8 0/1 (and -1 for empty or -1 when allowed); anything else is an
    InputError naming the line, the row's id and the column."""
    text = values.fillna("").astype(str).str.strip()
    number = pd.to_numeric(text, errors="coerce")
    blank = text == ""
    ok = number.isin([0, 1])
    if allow_unknown:
        ok |= blank | (number == UNKNOWN)
    if not ok.all():
        i = int(np.flatnonzero(~ok.to_numpy())[0])
        who = f" ({names.iloc[i]})" if names is not None else ""
        raise InputError(
            csv,
            f"line {int(index[i]) + 2}{who}, column {column}: value {text.iloc[i]!r} is not 0 "
            f"or 1" + (" (or empty/-1 for unknown)" if allow_unknown else ""),
        )
    return number.fillna(UNKNOWN).to_numpy().astype(np.int8)
