"""Checking an input before it is queued: cheap reads (DICOM headers, the zip's directory, the
NIfTI header, the image) that turn a non-CT or unreadable upload into a 422 with the reason
while the client still waits, instead of a failed job found later.

A job is what the worker needs to read the scan again (``job.json`` in the scan folder, never
served): the input kind and the path to load. DICOM discovery done here is handed to the
worker in memory so the headers are not read twice; after a restart it is redone.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichscan.errors import IchscanError, InputError
from ichscan.io.series import Discovery, discover
from ichscan.serve.uploads import (
    Limits,
    Upload,
    UploadError,
    check_dicom_candidates,
    check_zip_upload,
    upload_kind,
)

JOB = "job.json"
# A detail is one line the page shows; a reader's message (or an exception's) can be long.
MAX_DETAIL_CHARS = 500

log = logging.getLogger("ichscan.serve")


@dataclass
class Job:
    kind: str  # dicom (a folder), zip, nifti, image
    path: Path
    found: Discovery | None = None
    names: dict[str, str] = field(default_factory=dict)  # server path -> what the user knows

    def save(self, folder: Path) -> None:
        data = {"kind": self.kind, "path": str(self.path), "names": self.names}
        (folder / JOB).write_text(json.dumps(data))

    @classmethod
    def read(cls, folder: Path) -> Job:
        data = json.loads((folder / JOB).read_text())
        return cls(data["kind"], Path(data["path"]), names=data.get("names", {}))


def public(text: str, replacements: dict[str, str]) -> str:
    """A message with server paths replaced by what the user knows them as."""
    # Longest first, so a file's path is replaced before its folder's.
    for server, shown in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(server, shown)
    return text


def one_line(text: str) -> str:
    """A message as one bounded line. Some readers list one cause per line (one per decoder
    plugin, or a hint on a line of its own): those lines are joined."""
    text = re.sub(r":\s*\n[\s-]*", ": ", text.strip())
    text = re.sub(r"\s*\n[\s-]*", "; ", text)
    if len(text) > MAX_DETAIL_CHARS:
        text = text[: MAX_DETAIL_CHARS - 1] + "…"
    return text


def unexpected_problem(exc: BaseException, doing: str = "read") -> str:
    """What to tell the sender about an exception no reader turned into a refusal (a
    RecursionError, a decompression bomb, MemoryError...): its type and message, which is
    often all there is to say about the file."""
    message = str(exc) or ("out of memory" if isinstance(exc, MemoryError) else "no detail")
    return f"cannot be {doing} ({type(exc).__name__}: {message})"


def refusal(
    shown: str,
    exc: BaseException,
    names: dict[str, str],
    *,
    step: str = "checking the upload",
    doing: str = "read",
    scan_id: str | None = None,
) -> str:
    """The 422 detail for an unexpected exception about ``shown``. The traceback goes to the
    log under "unexpected": that is how the log tells these (a reader that should have
    refused the input cleanly, or a bug of ours) from plain bad input, refused without one."""
    where = f"scan {scan_id} ({shown})" if scan_id else shown
    log.error(
        "%s: unexpected %s while %s; answered 422 (a reader hole or a server bug)",
        where,
        type(exc).__name__,
        step,
        exc_info=exc,
    )
    return one_line(public(f"{shown}: {unexpected_problem(exc, doing)}", names))


def upload_names(folder: Path, upload_names: dict[str, str]) -> dict[str, str]:
    names = {str(folder / "upload" / stored): shown for stored, shown in upload_names.items()}
    names[str(folder / "upload")] = "upload"
    names[str(folder)] = "scan"
    return names


def check_upload(upload: Upload, limits: Limits, folder: Path) -> Job:
    """The job for an upload, or UploadError (413/422) naming the file and the problem."""
    kind = upload_kind(upload)
    names = upload_names(folder, upload.names)
    first = upload.files[0]
    path = upload.folder / first.stored
    try:
        if kind == "zip":
            check_zip_upload(path, limits, first.original)
            return Job("zip", path, _discovered(path, limits), names)
        if kind == "dicom":
            check_dicom_candidates(upload.folder, upload.names)
            return Job("dicom", upload.folder, _discovered(upload.folder, limits), names)
        if kind == "nifti":
            _check_nifti(path)
        else:
            from ichscan.io.image import read_grey

            read_grey(path)
        return Job(kind, path, names=names)
    except UploadError:
        raise
    except IchscanError as exc:
        raise UploadError(422, one_line(public(str(exc), names))) from None
    except Exception as exc:  # whatever a reader raises, the sender gets one line
        raise UploadError(422, refusal(upload.title, exc, names)) from None


def check_series_dir(path: Path, limits: Limits, names: dict[str, str]) -> Job:
    """The job for a DICOM folder already on the server (a store series)."""
    try:
        return Job("dicom", path, _discovered(path, limits), names)
    except IchscanError as exc:
        raise UploadError(422, one_line(public(str(exc), names))) from None
    except Exception as exc:
        shown = public(str(path), names)
        raise UploadError(422, refusal(shown, exc, names, step="reading a store series")) from None


def rediscover(job: Job, limits: Limits) -> Discovery:
    """Series discovery for a job read back from disk (after a restart)."""
    return job.found or _discovered(job.path, limits)


def _discovered(path: Path, limits: Limits) -> Discovery:
    found = discover(path, limits.zip_limits)
    if found.selected is None:
        reasons = "; ".join(str(b) for b in found.bad_files[:3]) or "no CT slices"
        more = f" (and {len(found.bad_files) - 3} more)" if len(found.bad_files) > 3 else ""
        raise InputError(None, f"no readable CT series: {reasons}{more}")
    return found


def _check_nifti(path: Path) -> None:
    """The upload is refused at intake, from its header, for what read_nifti would refuse."""
    from ichscan.io.nifti import open_nifti

    open_nifti(path)


def describe_discovery(found: Discovery) -> list[dict[str, Any]]:
    """The series the upload held besides the one read, and why they lost."""
    return [
        {
            "series_uid": s.series_uid,
            "description": s.description,
            "n_slices": s.n_slices,
            "selection_reason": s.selection_reason,
        }
        for s in found.series
        if not s.selected
    ]
