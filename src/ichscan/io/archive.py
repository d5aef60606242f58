"""Zip archives as input, defended against what uploads throw at a server: path traversal,
zip bombs, absurd member counts, and damaged or unreadable members. Members are read in
memory; nothing is extracted to a path the archive chose."""

from __future__ import annotations

import lzma
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ichscan.errors import InputError, one_line


@dataclass(frozen=True)
class ZipLimits:
    max_members: int = 20_000
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0  # CT compresses ~3:1; a 200:1 member is a bomb, not a scan


DEFAULT_LIMITS = ZipLimits()

# The methods Python's zipfile can decompress; anything else (Deflate64 from Windows
# Explorer, PPMd, AES) would fail inside the read with an exception that names no member.
_READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_METHOD_NAMES = {6: "Implode", 9: "Deflate64", 98: "PPMd", 99: "AES encryption"}
# What a damaged member raises while it is decompressed and its CRC checked.
_DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


@dataclass(frozen=True)
class ZipMember:
    """One file of the archive: its bytes, or why they could not be read (then data is None)."""

    name: str
    data: bytes | None
    problem: str | None = None


def _unsafe_name(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")


def check_zip(path: str | Path, limits: ZipLimits = DEFAULT_LIMITS) -> list[zipfile.ZipInfo]:
    """The file members of a safe archive; raises InputError naming the first problem."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(path, f"not a readable zip archive ({exc})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > limits.max_members:
        raise InputError(path, f"zip has {len(infos)} files, more than {limits.max_members}")
    total = 0
    for info in infos:
        if _unsafe_name(info.filename):
            raise InputError(path, f"zip entry {info.filename!r} points outside the archive")
        total += info.file_size
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            raise InputError(
                path,
                f"zip entry {info.filename!r} expands {info.file_size / info.compress_size:.0f}x "
                "(zip bomb?)",
            )
    if total > limits.max_total_bytes:
        raise InputError(
            path,
            f"zip expands to {total / 1e9:.1f} GB, over the {limits.max_total_bytes / 1e9:.1f}"
            " GB limit",
        )
    return infos


def iter_zip_members(path: str | Path, limits: ZipLimits = DEFAULT_LIMITS) -> Iterator[ZipMember]:
    """Each file of a checked archive, read one at a time. A member that cannot be read
    comes back with its problem, so one damaged entry does not cost the rest of the zip."""
    infos = check_zip(path, limits)
    archive_size = os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            problem = _unreadable(info, archive_size)
            if problem is not None:
                yield ZipMember(info.filename, None, problem)
                continue
            yield _read_member(zf, info)


def _unreadable(info: zipfile.ZipInfo, archive_size: int) -> str | None:
    """Why a member cannot be read, judged from its header alone (no decompression)."""
    if info.flag_bits & 0x1:
        return "zip entry is encrypted (password-protected); ichscan reads only plain zips"
    if info.compress_type not in _READABLE_METHODS:
        method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        return (
            f"zip entry uses compression {method}, which cannot be read; "
            "re-create the zip with standard (deflate) compression"
        )
    # The bomb check trusts compress_size; a header claiming more compressed bytes than the
    # archive holds is lying, and its expansion ratio means nothing.
    if info.compress_size > archive_size:
        return (
            f"zip entry claims {info.compress_size} compressed bytes, more than the whole "
            f"archive ({archive_size} bytes): damaged or crafted zip"
        )
    return None


def read_member_head(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, n_bytes: int, archive_size: int
) -> ZipMember:
    """The first ``n_bytes`` of a member (for a sniff of what it is), or why it cannot be
    read, in the words iter_zip_members uses for the whole member: encrypted, a method
    zipfile cannot decompress, a lying header, or a damaged stream. Never raises for a bad
    member; the CRC is not checked (the member is not read to its end)."""
    problem = _unreadable(info, archive_size)
    if problem is not None:
        return ZipMember(info.filename, None, problem)
    return _read(zf, info, n_bytes)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> ZipMember:
    # Never more than the declared size (which passed the bomb check) plus one byte, so a
    # lying header cannot make the read grow; zipfile checks the CRC at the end.
    member = _read(zf, info, info.file_size + 1)
    if member.data is not None and len(member.data) > info.file_size:
        return ZipMember(info.filename, None, "zip entry is larger than its header declares")
    return member


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, n_bytes: int) -> ZipMember:
    try:
        with zf.open(info) as member:
            data = member.read(n_bytes)
    except _DAMAGED as exc:
        return ZipMember(info.filename, None, _damage(exc))
    except (RuntimeError, NotImplementedError) as exc:
        # zipfile's words for encryption and unknown methods the header checks missed.
        return ZipMember(info.filename, None, f"zip entry cannot be read ({one_line(exc)})")
    return ZipMember(info.filename, data)


def _damage(exc: BaseException) -> str:
    text = one_line(exc)
    if "CRC" in text:
        return "zip entry is damaged: its checksum (CRC-32) does not match its contents"
    if isinstance(exc, EOFError):
        return "zip entry is truncated: the archive ends inside it"
    if isinstance(exc, zlib.error | lzma.LZMAError):
        return f"zip entry is damaged: its compressed data cannot be decompressed ({text})"
    return f"zip entry is damaged ({text})"
