"""The manifest: one table, one row per slice, that every dataset adapter produces and that
training, splitting and evaluation read. Stored as Parquet with its facts (label set, label
level, layout) in the file's key-value metadata, so a manifest explains itself.

Columns (in this order, then one int8 column per label of the label set):

| column       | type    | meaning                                                          |
|--------------|---------|------------------------------------------------------------------|
| path         | str     | file holding the slice (DICOM file, NIfTI volume, PNG, zip), or  |
|              |         | the folder or zip holding a series read as slabs                 |
| member       | str     | zip member name, or the slabs' SeriesInstanceUID; "" otherwise    |
| kind         | str     | "dicom", "nifti", "image", or "series": slab `slice_index` of the |
|              |         | series resliced to the facts' `slab_mm` (CQ500 at 5 mm)          |
| image_id     | str     | SOP Instance UID, or file stem (images), or "<stem>-<k>" (NIfTI)  |
| patient_id   | str     | patient (splits never put one patient in two folds)              |
| study_id     | str     | StudyInstanceUID or equivalent                                   |
| series_id    | str     | SeriesInstanceUID or equivalent                                  |
| scan_id      | str     | the unit of scan-level prediction (a series, a volume, an image)  |
| slice_index  | int32   | position of the slice in its scan after ordering in space        |
| position_mm  | float64 | position along the slice normal (NaN when unknown)               |
| window       | str     | for images: the window their pixels are already in; "" for HU    |
| fold         | int8    | cross-validation fold, -1 = not assigned                         |
| holdout      | bool    | in the fixed hold-out set                                        |

Label values are 1 (present), 0 (absent) or -1 (unknown / not labelled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ichscan.errors import InputError
from ichscan.labels import LabelSet, get_label_set

BASE_COLUMNS: dict[str, str] = {
    "path": "object",
    "member": "object",
    "kind": "object",
    "image_id": "object",
    "patient_id": "object",
    "study_id": "object",
    "series_id": "object",
    "scan_id": "object",
    "slice_index": "int32",
    "position_mm": "float64",
    "window": "object",
    "fold": "int8",
    "holdout": "bool",
}
UNKNOWN = -1
META_KEY = b"ichscan"


def empty_manifest(label_set: LabelSet) -> pd.DataFrame:
    columns = {c: pd.Series(dtype=t) for c, t in BASE_COLUMNS.items()}
    columns.update({label: pd.Series(dtype="int8") for label in label_set.labels})
    return pd.DataFrame(columns)


def normalise(df: pd.DataFrame, label_set: LabelSet) -> pd.DataFrame:
    """Fill defaults, order and type the columns; raise on what cannot be a manifest."""
    df = df.copy()
    defaults: dict[str, Any] = {
        "member": "",
        "kind": "dicom",
        "window": "",
        "fold": -1,
        "holdout": False,
        "position_mm": np.nan,
        "slice_index": 0,
    }
    for column, value in defaults.items():
        if column not in df:
            df[column] = value
    # Coarser ids stand in for finer ones that a layout does not have (a PNG set has
    # patients only): study ← patient, series ← study, scan ← series.
    for column, fallback in (
        ("study_id", "patient_id"),
        ("series_id", "study_id"),
        ("scan_id", "series_id"),
    ):
        if column not in df and fallback in df:
            df[column] = df[fallback]
    missing = [c for c in BASE_COLUMNS if c not in df]
    if missing:
        raise ValueError(f"manifest lacks column(s) {', '.join(missing)}")
    for label in label_set.labels:
        if label not in df:
            df[label] = UNKNOWN
        bad = ~df[label].isin([0, 1, UNKNOWN])
        if bad.any():
            example = df.loc[bad, label].iloc[0]
            raise ValueError(f"label {label!r} has value {example!r}; expected 0, 1 (or -1)")
    df = df[[*BASE_COLUMNS, *label_set.labels]]
    return df.astype({**BASE_COLUMNS, **{label: "int8" for label in label_set.labels}})


def write_manifest(df: pd.DataFrame, out: str | Path, label_set: LabelSet, **facts: Any) -> Path:
    """Write as Parquet; `facts` (layout, label_level, source, report...) go in the metadata."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = normalise(df, label_set)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {"label_set": label_set.name, "labels": list(label_set.labels), **facts}
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), META_KEY: json.dumps(meta, default=str).encode()}
    )
    tmp = out.with_suffix(out.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


def read_manifest(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(table, facts). The label set named in the facts is checked against the columns."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise InputError(path, "manifest not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a readable Parquet manifest ({exc})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise InputError(path, "Parquet file is not an ichscan manifest (no ichscan metadata)")
    facts = json.loads(raw)
    label_set = get_label_set(facts["label_set"])
    df = table.to_pandas()
    missing = [c for c in (*BASE_COLUMNS, *label_set.labels) if c not in df]
    if missing:
        raise InputError(path, f"manifest lacks column(s) {', '.join(missing)}")
    return df, facts


def label_set_of(facts: dict[str, Any]) -> LabelSet:
    return get_label_set(facts["label_set"])
