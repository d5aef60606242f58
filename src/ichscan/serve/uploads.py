"""Receiving an upload: the multipart body streamed to disk under server-chosen names, with
the size limits enforced while the bytes arrive, then sorted into one kind of scan input.

Starlette's own form parser spools every file (of any size) to a temporary file before the
endpoint sees it, so it cannot stop a 50 GB body at the limit; this parser writes each part
straight into the scan's folder and aborts with 413 as soon as the count goes past it. The
user's file name is kept only as text to show; on disk a file is ``NNNN<suffix>`` where the
suffix comes from an allow-list.
"""

from __future__ import annotations

import re
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ichscan.errors import InputError
from ichscan.io.archive import ZipLimits, check_zip, read_member_head
from ichscan.io.image import IMAGE_SUFFIXES
from ichscan.io.load import input_kind
from ichscan.io.series import IGNORED_NAMES, NON_DICOM_SUFFIXES

FIELD = "files"
# Suffixes that decide how a file is read. Sidecar suffixes that series discovery skips are
# kept too (see stored_name); anything else is stored without one (DICOM files often have
# no suffix at all, and the reader does not need one). The image suffixes are the CLI's, so
# an upload is read as the same file given to `ichscan predict` would be.
KEPT_SUFFIXES = (".nii.gz", ".nii", ".zip", ".dcm", *sorted(IMAGE_SUFFIXES))
# Multipart framing (boundaries, part headers) on top of the file bytes.
_FRAMING_SLACK = 1024 * 1024
# Buffered file bytes handed to a thread in one go: big enough that the hop is rare, small
# enough that memory per upload stays flat.
_FLUSH_BYTES = 1024 * 1024
_FLUSH_ITEMS = 256  # ... or this many writes and closes (many small files)
_SHOWN_NAME_CHARS = 200
# Files and zip members above this size must start like DICOM before the reader sees them.
_SNIFF_FROM_BYTES = 1024 * 1024
_NOT_READ_AS_DICOM = (".zip", ".nii", ".gz", *IMAGE_SUFFIXES, *NON_DICOM_SUFFIXES)


@dataclass(frozen=True)
class Limits:
    """What one upload may be. ``max_upload_bytes`` counts the files' bytes as sent (a zip
    compressed); the zip limits count what its members would expand to."""

    max_upload_bytes: int = 1024**3
    max_files: int = 20_000
    max_zip_members: int = 20_000
    max_zip_bytes: int = 8 * 1024**3
    max_zip_ratio: float = 200.0

    @property
    def zip_limits(self) -> ZipLimits:
        return ZipLimits(self.max_zip_members, self.max_zip_bytes, self.max_zip_ratio)


class UploadError(Exception):
    """An upload refused with an HTTP status and one line saying why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class StoredFile:
    stored: str  # name on disk, chosen here
    original: str  # the name the client sent, for display only
    size: int = 0


@dataclass
class Upload:
    folder: Path
    files: list[StoredFile] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def names(self) -> dict[str, str]:
        return {f.stored: f.original for f in self.files}

    @property
    def title(self) -> str:
        """The upload as its sender knows it: the first file's name, and how many more."""
        more = len(self.files) - 1
        return self.files[0].original + (f" (+{more} files)" if more > 0 else "")


def shown_name(raw: str) -> str:
    """A client's file name made safe to show: the last path part, printable, bounded."""
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    return name[:_SHOWN_NAME_CHARS] or "unnamed"


def stored_name(index: int, original: str) -> str:
    """``NNNN`` plus a suffix from an allow-list: the readable kinds (.dcm, .zip, .nii[.gz],
    the images the CLI reads: .png, .jpg, .jpeg, .tif, .tiff, .bmp) and the sidecar files
    series discovery skips (.txt, .pdf, .csv...); names discovery ignores (DICOMDIR,
    .DS_Store, Thumbs.db...) become hidden files, which it ignores too. Nothing of the
    client's name reaches the disk but that suffix."""
    suffix = stored_suffix(original)
    if original in IGNORED_NAMES or original.startswith("."):
        return f".{index:04d}"
    return f"{index:04d}{suffix}"


def stored_suffix(original: str) -> str:
    lower = original.lower()
    kept = next((s for s in KEPT_SUFFIXES if lower.endswith(s)), "")
    if kept:
        return kept
    suffix = Path(lower).suffix
    return suffix if suffix in NON_DICOM_SUFFIXES else ""


def looks_like_dicom(head: bytes) -> bool:
    """The first 132 bytes of a DICOM file: the "DICM" marker after the preamble, or (an
    old file without one) a first element in group 0002 or 0008."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def check_dicom_candidates(folder: Path, names: dict[str, str]) -> None:
    """Refuse an upload with no file series discovery would read (only sidecar files), and
    a large file that does not start like DICOM before the reader searches it (a forced
    parse of hundreds of MB of zeros takes minutes); small ones are left to the reader,
    which names what is wrong with them."""
    candidates = [
        p
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and p.suffix.lower() not in _NOT_READ_AS_DICOM
    ]
    if not candidates:
        shown = ", ".join(sorted(names.values())[:5])
        raise UploadError(422, f"no DICOM, NIfTI or image file in the upload ({shown})")
    for path in candidates:
        if path.stat().st_size > _SNIFF_FROM_BYTES:
            with open(path, "rb") as f:
                head = f.read(132)
            if not looks_like_dicom(head):
                shown = names.get(path.name, path.name)
                raise UploadError(422, f"{shown}: not a DICOM file (no DICM marker)")


def _mb(n: float) -> str:
    """Bytes for people: 1 GB, 500 MB, 9.766 KB (binary units, at most 4 digits)."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.0f} bytes"


class _Receiver:
    """python-multipart callbacks collecting each file part's bytes; ``flush`` (run in a
    thread) writes them into ``folder``. The parser runs on the event loop, the disk I/O
    does not, and only the part being written has an open file: 20,000 small parts never
    hold 20,000 descriptors."""

    def __init__(self, upload: Upload, limits: Limits) -> None:
        self.upload = upload
        self.limits = limits
        self.header_name = b""
        self.header_value = b""
        self.disposition = b""
        self.current: StoredFile | None = None
        # (file, bytes) to append, or (file, None) when its part has ended.
        self.pending: list[tuple[Path, bytes | None]] = []
        self.pending_bytes = 0
        self.total = 0
        self.handle: BinaryIO | None = None
        self.handle_path: Path | None = None

    def callbacks(self) -> dict[str, Callable[..., Any]]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != FIELD:
            raise UploadError(
                422, f"unexpected form field {name!r}: send the scan's files as {FIELD!r}"
            )
        if b"filename" not in options:
            raise UploadError(422, f"form field {FIELD!r} must carry files, not text")
        if len(self.upload.files) >= self.limits.max_files:
            raise UploadError(413, f"more than {self.limits.max_files} files in one upload")
        original = shown_name(options[b"filename"].decode("utf-8", "replace"))
        index = len(self.upload.files)
        stored = StoredFile(stored_name(index, original), original)
        self.upload.files.append(stored)
        self.current = stored
        self.pending.append((self._path(stored), b""))  # an empty part is still a file

    def _path(self, stored: StoredFile) -> Path:
        return self.upload.folder / stored.stored

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is None:
            return
        n = end - start
        self.total += n
        if self.total > self.limits.max_upload_bytes:
            raise UploadError(
                413, f"upload is larger than the {_mb(self.limits.max_upload_bytes)} limit"
            )
        self.current.size += n
        self.pending.append((self._path(self.current), data[start:end]))
        self.pending_bytes += n

    def on_part_end(self) -> None:
        if self.current is not None:
            self.pending.append((self._path(self.current), None))
        self.current = None

    def flush(self) -> None:
        for path, chunk in self.pending:
            if path != self.handle_path:
                self.close()
                self.handle = open(path, "ab")  # noqa: SIM115 (kept open across flushes)
                self.handle_path = path
            if chunk is None:
                self.close()
            else:
                assert self.handle is not None
                self.handle.write(chunk)
        self.pending.clear()
        self.pending_bytes = 0

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = None
        self.handle_path = None


async def receive(request: Request, folder: Path, limits: Limits) -> Upload:
    """Stream the ``files`` parts of a multipart request into ``folder`` (which exists and
    is empty). Raises UploadError (413, 415, 422); the caller removes ``folder`` then."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UploadError(
            415, f"send the scan as multipart/form-data with one or more {FIELD!r} fields"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(422, "multipart/form-data without a boundary")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes + _FRAMING_SLACK:
        raise UploadError(413, f"upload is larger than the {_mb(limits.max_upload_bytes)} limit")
    upload = Upload(folder)
    receiver = _Receiver(upload, limits)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.pending_bytes >= _FLUSH_BYTES or len(receiver.pending) >= _FLUSH_ITEMS:
                await anyio.to_thread.run_sync(receiver.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(receiver.flush)
    except FormParserError as exc:
        raise UploadError(422, f"malformed multipart body ({exc})") from None
    except ClientDisconnect:
        raise UploadError(400, "the client went away before the upload finished") from None
    finally:
        receiver.close()
    if not upload.files:
        raise UploadError(422, f"no files in the upload (multipart field {FIELD!r})")
    return upload


# -- what was uploaded ---------------------------------------------------------------------


def upload_kind(upload: Upload) -> str:
    """'zip', 'nifti', 'image' or 'dicom' for an upload that is one kind of scan input."""
    kinds = ["zip" if f.stored.endswith(".zip") else input_kind(f.stored) for f in upload.files]
    if all(k == "dicom" for k in kinds):
        return "dicom"
    if len(kinds) == 1:
        return kinds[0]
    raise UploadError(
        422,
        "one scan per upload: send one zip, one NIfTI volume, one PNG/JPEG/TIFF/BMP slice, "
        f"or the DICOM files of one series (got {len(kinds)} files: "
        + ", ".join(sorted(set(kinds)))
        + ")",
    )


def check_zip_upload(path: Path, limits: Limits, shown: str) -> None:
    """Refuse an archive before anything reads its members: too many members, too much
    uncompressed data, or a member that expands like a zip bomb (413); entries that point
    outside the archive, an unreadable zip or a large member that is not DICOM (422). A
    member that cannot be opened at all is not a refusal: it is left to series discovery,
    which skips it and names it as the CLI does."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(422, f"{shown}: not a readable zip archive ({exc})") from None
    if len(infos) > limits.max_zip_members:
        raise UploadError(
            413, f"{shown}: zip has {len(infos)} files, more than {limits.max_zip_members}"
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_zip_bytes:
        raise UploadError(
            413,
            f"{shown}: zip expands to {_mb(total)}, over the {_mb(limits.max_zip_bytes)} limit",
        )
    for info in infos:
        if info.compress_size and info.file_size / info.compress_size > limits.max_zip_ratio:
            raise UploadError(
                413,
                f"{shown}: zip entry {info.filename!r} expands "
                f"{info.file_size / info.compress_size:.0f}x (zip bomb?)",
            )
    try:
        check_zip(path, limits.zip_limits)  # path traversal and the rest of its checks
    except InputError as exc:
        raise UploadError(422, f"{shown}: {exc.problem}") from None
    archive_size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            member = PurePosixPath(info.filename)
            if info.file_size <= _SNIFF_FROM_BYTES or member.name.startswith("."):
                continue
            if member.suffix.lower() in _NOT_READ_AS_DICOM or member.name in IGNORED_NAMES:
                continue
            head = read_member_head(zf, info, 132, archive_size)
            if head.data is None:
                # Encrypted, Deflate64, damaged...: series discovery reads the zip with the
                # same judgement, names it as a skipped file ("zip!member: problem") and
                # reads the other members; if none is left, the upload is 422 naming them.
                continue
            if not looks_like_dicom(head.data):
                raise UploadError(
                    422, f"{shown}!{info.filename}: not a DICOM file (no DICM marker)"
                )
