"""PNG/JPEG slices: any grey or colour layout becomes uint8 grey, and an image no CT slice
could be (a decompression bomb) is refused from its header, before any pixel is decoded."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ichscan.errors import InputError
from ichscan.io.image import MAX_SLICE_PIXELS, read_grey, read_image


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming width x height, with no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_grey_png_round_trips(tmp_path: Path) -> None:
    grey = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 256
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_grey(tmp_path / "a.png"), grey)
    scan = read_image(tmp_path / "a.png")
    assert scan.shape == (1, 64, 48)


def test_header_claiming_100000_squared_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(InputError) as info:
        read_grey(path)
    # Pillow itself stops this one while opening, before the width and height are known.
    assert str(info.value).startswith(f"{path}: image is too large for a CT slice")
    assert "decompression bomb" in str(info.value)


def test_header_between_pillows_warning_and_error_is_refused_quietly(tmp_path: Path) -> None:
    # 12000 x 12000: Pillow only warns and would decode all 144 million pixels.
    path = _png_header_only(tmp_path / "big.png", 12_000, 12_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape either
        with pytest.raises(InputError, match="image of 12000x12000 pixels is too large"):
            read_grey(path)


def test_largest_allowed_header_is_not_refused_as_too_large(tmp_path: Path) -> None:
    side = int(MAX_SLICE_PIXELS**0.5)
    path = _png_header_only(tmp_path / "edge.png", side, side)
    # No pixel data, so it fails later, as any truncated image does; not for its size.
    with pytest.raises(InputError, match="not a readable image") as info:
        read_grey(path)
    assert "too large" not in str(info.value)


def test_large_but_sane_image_still_reads(tmp_path: Path) -> None:
    big = np.zeros((3000, 4000), np.uint8)
    big[1500, 2000] = 200
    Image.fromarray(big).save(tmp_path / "scan.png", compress_level=1)
    grey = read_grey(tmp_path / "scan.png")
    assert grey.shape == (3000, 4000) and grey[1500, 2000] == 200
