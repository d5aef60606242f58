"""Zip archives as input, defended against what uploads throw at a server: path traversal,
zip bombs, absurd member counts. Members are read in memory; nothing is extracted to a path
the archive chose."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ichscan.errors import InputError


@dataclass(frozen=True)
class ZipLimits:
    max_members: int = 20_000
    max_total_bytes: int = 8 * 1024**3
    max_ratio: float = 200.0  # CT compresses ~3:1; a 200:1 member is a bomb, not a scan


DEFAULT_LIMITS = ZipLimits()


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


def iter_zip_members(
    path: str | Path, limits: ZipLimits = DEFAULT_LIMITS
) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for each file in a checked archive, read one at a time."""
    infos = check_zip(path, limits)
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            with zf.open(info) as member:
                # Read one byte past the declared size: a lying header must not get through.
                data = member.read(info.file_size + 1)
            if len(data) > info.file_size:
                raise InputError(path, f"zip entry {info.filename!r} is larger than declared")
            yield info.filename, data
