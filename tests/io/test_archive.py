"""Zip input: each damaged member is named and skipped, the good members are still read, and
no header (however it lies) makes a read larger than the bomb check allowed."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ichscan
from ichscan.errors import InputError
from ichscan.io.archive import ZipMember, check_zip, iter_zip_members, read_member_head
from ichscan.io.dicom_write import write_ct_series

GOOD = b"good member " * 100
LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"
# Field offsets inside the local and the central directory header of a member.
FLAGS = {LOCAL: 6, CENTRAL: 8}
METHOD = {LOCAL: 8, CENTRAL: 10}
COMPRESSED_SIZE = {LOCAL: 18, CENTRAL: 20}
SIZE = {LOCAL: 22, CENTRAL: 24}


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def _patch_headers(raw: bytes, name: str, field: dict[bytes, int], fmt: str, value: int) -> bytes:
    """Set one field in both headers of the member called name (local and central)."""
    out = bytearray(raw)
    encoded = name.encode()
    for sig, offset in field.items():
        start = 0
        while (start := out.find(sig, start)) >= 0:
            name_at = start + (30 if sig == LOCAL else 46)
            if out[name_at : name_at + len(encoded)] == encoded:
                if field is FLAGS:
                    value_now = struct.unpack_from(fmt, out, start + offset)[0]
                    struct.pack_into(fmt, out, start + offset, value_now | value)
                else:
                    struct.pack_into(fmt, out, start + offset, value)
            start += 4
    return bytes(out)


def _members(path: Path) -> dict[str, ZipMember]:
    return {m.name: m for m in iter_zip_members(path)}


def _with_bad_member(tmp_path: Path, method: int = zipfile.ZIP_DEFLATED) -> tuple[Path, bytes]:
    path = tmp_path / "scan.zip"
    raw = _zip(path, {"good.dcm": GOOD, "bad.dcm": bytes(range(256)) * 40}, method)
    return path, raw


def test_good_members_are_read(tmp_path: Path) -> None:
    path = tmp_path / "scan.zip"
    _zip(path, {"a.dcm": GOOD, "sub/b.dcm": GOOD[::-1]})
    members = _members(path)
    assert members["a.dcm"] == ZipMember("a.dcm", GOOD)
    assert members["sub/b.dcm"].data == GOOD[::-1]


def test_bad_crc_member_is_named_and_the_rest_read(tmp_path: Path) -> None:
    path, raw = _with_bad_member(tmp_path, zipfile.ZIP_STORED)
    data_at = raw.index(bytes(range(256)))
    damaged = bytearray(raw)
    damaged[data_at + 1000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert members["bad.dcm"].data is None
    assert members["bad.dcm"].problem == (
        "zip entry is damaged: its checksum (CRC-32) does not match its contents"
    )


def test_bad_deflate_stream_is_named_and_the_rest_read(tmp_path: Path) -> None:
    path = tmp_path / "scan.zip"
    raw = _zip(path, {"bad.dcm": np.random.default_rng(0).bytes(20_000), "good.dcm": GOOD})
    info = zipfile.ZipFile(path).getinfo("bad.dcm")
    data_at = info.header_offset + 30 + len("bad.dcm")
    damaged = bytearray(raw)
    for i in range(data_at + 10, data_at + 70):
        damaged[i] ^= 0x5A
    path.write_bytes(bytes(damaged))
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert members["bad.dcm"].problem.startswith("zip entry is damaged")


def test_encrypted_member_is_named_and_the_rest_read(tmp_path: Path) -> None:
    path, raw = _with_bad_member(tmp_path)
    path.write_bytes(_patch_headers(raw, "bad.dcm", FLAGS, "<H", 0x1))
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert "encrypted (password-protected)" in members["bad.dcm"].problem


def test_unsupported_method_is_named_and_the_rest_read(tmp_path: Path) -> None:
    path, raw = _with_bad_member(tmp_path)
    path.write_bytes(_patch_headers(raw, "bad.dcm", METHOD, "<H", 9))
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert "compression Deflate64, which cannot be read" in members["bad.dcm"].problem


def test_size_declared_smaller_than_the_data_stops_at_the_declared_size(tmp_path: Path) -> None:
    # 2 MB of zeros declared as 1000 bytes: the ratio check sees 1000 / ~2 kB and passes,
    # so the read itself must not go past the 1000 bytes it was promised.
    path = tmp_path / "scan.zip"
    raw = _zip(path, {"good.dcm": GOOD, "bad.dcm": bytes(2_000_000)})
    path.write_bytes(_patch_headers(raw, "bad.dcm", SIZE, "<I", 1000))
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert members["bad.dcm"].data is None
    assert "checksum (CRC-32)" in members["bad.dcm"].problem


def test_compressed_size_larger_than_the_archive_is_refused_unread(tmp_path: Path) -> None:
    # A bomb could claim a compressed size as large as its real size to pass the ratio
    # check; the archive cannot hold more compressed bytes than its own length.
    path = tmp_path / "scan.zip"
    raw = _zip(path, {"good.dcm": GOOD, "bad.dcm": bytes(2_000_000)})
    raw = _patch_headers(raw, "bad.dcm", COMPRESSED_SIZE, "<I", 2_000_000)
    path.write_bytes(raw)
    check_zip(path)  # the ratio of the declared sizes looks harmless
    members = _members(path)
    assert members["good.dcm"].data == GOOD
    assert "more than the whole archive" in members["bad.dcm"].problem


def test_zip_of_series_with_damaged_member_loads_the_rest(
    tmp_path: Path, phantom_volume: np.ndarray
) -> None:
    paths = write_ct_series(phantom_volume, tmp_path / "series")
    archive = tmp_path / "scan.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            zf.write(p, p.name)
    raw = _patch_headers(archive.read_bytes(), paths[3].name, FLAGS, "<H", 0x1)
    archive.write_bytes(raw)
    scan = ichscan.load(archive)
    assert scan.n_slices == len(paths) - 1
    assert f"skipped {archive}!{paths[3].name}: zip entry is encrypted" in "\n".join(scan.warnings)


def test_zip_of_only_damaged_members_names_them(tmp_path: Path) -> None:
    path, raw = _with_bad_member(tmp_path)
    raw = _patch_headers(raw, "bad.dcm", METHOD, "<H", 9)
    path.write_bytes(_patch_headers(raw, "good.dcm", METHOD, "<H", 9))
    with pytest.raises(InputError, match=r"scan\.zip!bad\.dcm: zip entry uses compression"):
        ichscan.load(path)


def _heads(path: Path, n_bytes: int = 132) -> dict[str, ZipMember]:
    with zipfile.ZipFile(path) as zf:
        size = path.stat().st_size
        return {i.filename: read_member_head(zf, i, n_bytes, size) for i in zf.infolist()}


def test_member_head_is_read_or_judged_as_the_whole_member_would_be(tmp_path: Path) -> None:
    """The server sniffs the first bytes of large members; a member it cannot open gets
    the words iter_zip_members gives it, not zipfile's exception."""
    path, raw = _with_bad_member(tmp_path)
    assert _heads(path)["good.dcm"] == ZipMember("good.dcm", GOOD[:132])
    for field, value, words in [
        (FLAGS, 0x1, "zip entry is encrypted (password-protected)"),
        (METHOD, 9, "zip entry uses compression Deflate64, which cannot be read"),
    ]:
        path.write_bytes(_patch_headers(raw, "bad.dcm", field, "<H", value))
        head = _heads(path)["bad.dcm"]
        assert head.data is None and head.problem is not None
        assert head.problem.startswith(words)
        assert head.problem == _members(path)["bad.dcm"].problem


def test_member_head_of_a_damaged_stream_names_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "scan.zip"
    raw = bytearray(_zip(path, {"bad.dcm": np.random.default_rng(0).bytes(20_000)}))
    raw[30 + len("bad.dcm")] |= 0x06  # the first deflate block's type set to 3 (reserved)
    path.write_bytes(bytes(raw))
    head = _heads(path)["bad.dcm"]
    assert head.data is None
    assert head.problem == _members(path)["bad.dcm"].problem
    assert head.problem.startswith(
        "zip entry is damaged: its compressed data cannot be decompressed"
    )
