"""The labelled inputs a run left out, with why: what `prepare` and `evaluate` list.

NumPy-free and torch-free, so that `ichscan prepare` can say what it skipped without
importing the model stack (torch alone is about 0.5 GB resident)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["NO_FILE", "prepare_bad", "skipped_inputs"]

NO_FILE = "labelled, but no file found"


def skipped_inputs(report: Any | None, prepare_report: Path | None) -> list[dict[str, str]]:
    """Every labelled input left out, with why: files the adapter could not read, labels
    whose file is missing (``report``, an AdapterReport), and slices whose pixels could not
    be read (the ``report.json`` that prepare wrote)."""
    out: list[dict[str, str]] = []
    if report is not None:
        out += [{"path": str(b["path"]), "reason": str(b["reason"])} for b in report.bad_files]
        # A file named by its label's id that could not be read leaves that label without a
        # file too (the DICOM layout counts both): list the file once, with its reason.
        listed = {Path(e["path"]).stem for e in out} | {Path(e["path"]).name for e in out}
        out += [
            {"path": str(name), "reason": NO_FILE}
            for name in report.labels_without_files
            if str(name) not in listed
        ]
    if prepare_report is not None:
        out += prepare_bad(prepare_report)
    return out


def prepare_bad(path: Path) -> list[dict[str, str]]:
    """The rows prepare's report.json lists as unreadable (none for a cache prepared before
    the report existed)."""
    try:
        bad = json.loads(path.read_text()).get("bad", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [
        {
            "path": f"{b['path']}!{b['member']}" if b.get("member") else str(b["path"]),
            "reason": str(b.get("reason", "")),
        }
        for b in bad
    ]
