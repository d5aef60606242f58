"""Map Hounsfield units to display values through CT windows.

A window ``(center, width)`` selects the HU range ``[center - width/2, center + width/2]``.
Two transfer functions are offered:

``linear``
    ``y = clip((hu - low) / width, 0, 1)``: the classic radiology window. Brain 40/80 sends
    0 HU to 0 and 80 HU to 1 (255 as uint8).

``sigmoid``
    The smooth window popularised in the RSNA 2019 intracranial haemorrhage challenge::

        y = 1 / (1 + exp(-k * (hu - center) / width)),   k = 2 * ln(254)

    ``k`` is chosen so that the window edges land on the first and last uint8 steps:
    ``y(center) = 0.5`` exactly, ``y(low) = 1/255`` and ``y(high) = 254/255``. It is
    strictly increasing, and unlike the linear window it keeps some contrast beyond the
    edges, which is where subtle blood against bone lives.

uint8 output is ``round(255 * y)`` (round half to even, as ``np.rint``); float32 output is
``y`` in ``[0, 1]``. All arithmetic is float32 on one working copy per call, so an int16
volume never turns into a float64 temporary. NaN input (float volumes only) maps to 0.

The fast path for integer HU (the normal case: DICOM pixel data is int16) is a lookup
table over all 65536 int16 values, ``window_lut`` + ``apply_lut``. It is built by running
the direct path over every int16 value, so both agree exactly.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "DEFAULT_WINDOWS",
    "WINDOWS",
    "Window",
    "apply_lut",
    "apply_window",
    "parse_windows",
    "stack_windows",
    "window_lut",
]


class Window(NamedTuple):
    """A CT display window in HU."""

    name: str
    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


_SOFT_TISSUE = Window("soft_tissue", 40.0, 380.0)

WINDOWS: dict[str, Window] = {
    "brain": Window("brain", 40.0, 80.0),
    "subdural": Window("subdural", 80.0, 200.0),
    "bone": Window("bone", 600.0, 2800.0),
    "soft_tissue": _SOFT_TISSUE,
    "soft": _SOFT_TISSUE,
}

DEFAULT_WINDOWS: tuple[str, ...] = ("brain", "subdural", "bone")

_MODES = ("linear", "sigmoid")
# Slope of the sigmoid window in units of 1/width: puts the edges on 1/255 and 254/255.
_SIGMOID_K = 2.0 * math.log(254.0)
# exp() of anything beyond this is already 0 or 1 at float32 precision after rounding to
# uint8; clamping avoids overflow warnings from exp(+large).
_SIGMOID_ZMAX = 30.0
_CUSTOM = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)\s*$")

WindowSpec = str | Window | Sequence[str | Window]


def _parse_one(item: str | Window) -> Window:
    if isinstance(item, Window):
        if not item.width > 0:
            raise ValueError(f"window {item.name!r} has width {item.width}; it must be > 0")
        return item
    if not isinstance(item, str):
        raise TypeError(f"a window is a name, 'center/width' or a Window, not {item!r}")
    key = item.strip().lower()
    if key in WINDOWS:
        return WINDOWS[key]
    match = _CUSTOM.match(key)
    if match:
        center, width = float(match.group(1)), float(match.group(2))
        if not width > 0:
            raise ValueError(f"window {item!r} has width {width}; it must be > 0")
        return Window(key.replace(" ", ""), center, width)
    valid = ", ".join(WINDOWS)
    raise ValueError(f"unknown window {item!r}; use one of {valid}, or 'center/width' like 50/150")


def parse_windows(spec: WindowSpec) -> list[Window]:
    """Windows from ``"brain,subdural,bone"``, ``"50/150"``, or a sequence of names/Windows.

    Names are case-insensitive. Raises ValueError for an unknown name or an empty spec.
    """
    if isinstance(spec, Window):
        # A Window is itself a tuple; iterating it would yield its fields.
        items: list[str | Window] = [spec]
    elif isinstance(spec, str):
        items = [part for part in spec.split(",") if part.strip()]
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"no windows in {spec!r}; use e.g. {','.join(DEFAULT_WINDOWS)}")
    return [_parse_one(item) for item in items]


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"window mode must be one of {_MODES}, got {mode!r}")


def _check_dtype(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"windowed output dtype must be uint8 or float32, got {dt}")
    return dt


def _as_float32(hu: np.ndarray) -> np.ndarray:
    # Always a fresh C-ordered buffer: the window math runs in place on it, and a contiguous
    # buffer makes every call take the same (SIMD) ufunc loops, so the LUT built from a
    # contiguous arange matches results on any strided input bit for bit.
    return np.array(hu, dtype=np.float32, order="C", copy=True)


def _window_f32(
    src: np.ndarray, window: Window, mode: str, scale: float, *, inplace: bool = False
) -> np.ndarray:
    """Window a float32 array into float32 values in ``[0, scale]``.

    Writes into ``src`` when ``inplace``, else into a new array. With ``scale=255`` the
    result is already rounded to integers, ready for a uint8 cast.
    """
    # An explicit out= keeps 0-d inputs as arrays (a bare ufunc would return a scalar).
    buf = src if inplace else np.empty_like(src)
    if mode == "linear":
        # One fused scale factor: (hu - low) * (scale / width); exact for the presets
        # (255/80 = 3.1875 is a float32), so brain maps 80 HU to exactly 255.
        np.subtract(src, np.float32(window.low), out=buf)
        buf *= np.float32(scale / window.width)
        np.clip(buf, 0.0, scale, out=buf)
    else:
        np.subtract(src, np.float32(window.center), out=buf)
        # exp(-z) with z = k (hu - c) / width
        buf *= np.float32(-_SIGMOID_K / window.width)
        np.clip(buf, -_SIGMOID_ZMAX, _SIGMOID_ZMAX, out=buf)
        np.exp(buf, out=buf)
        buf += np.float32(1.0)
        np.divide(np.float32(scale), buf, out=buf)
    if scale == 255.0:
        np.rint(buf, out=buf)
    return buf


def _finish(buf: np.ndarray, src_is_float: bool) -> np.ndarray:
    if src_is_float:
        # NaN survives clip/exp; send it to 0 (air) instead of an undefined uint8 cast.
        np.nan_to_num(buf, copy=False, nan=0.0)
    return buf


def apply_window(
    hu: np.ndarray,
    window: Window | str,
    *,
    mode: str = "linear",
    dtype: DTypeLike = np.uint8,
) -> np.ndarray:
    """Window an HU array of any shape; returns the same shape as uint8 (0-255) or float32.

    ``window`` is a Window, a preset name or ``"center/width"``.
    """
    _check_mode(mode)
    dt = _check_dtype(dtype)
    wins = parse_windows(window) if isinstance(window, str) else [_parse_one(window)]
    if len(wins) != 1:
        raise ValueError(f"apply_window takes one window, got {window!r}; use stack_windows")
    win = wins[0]
    arr = np.asarray(hu)
    scale = 255.0 if dt == np.uint8 else 1.0
    work = _as_float32(arr)  # the only full-size temporary: windowed in place
    buf = _finish(_window_f32(work, win, mode, scale, inplace=True), arr.dtype.kind in "fc")
    return buf.astype(dt, copy=False)


def stack_windows(
    hu: np.ndarray,
    windows: WindowSpec = DEFAULT_WINDOWS,
    *,
    mode: str = "linear",
    dtype: DTypeLike = np.uint8,
) -> np.ndarray:
    """Window ``hu`` once per window and stack the results channels-last: ``[..., C]``."""
    _check_mode(mode)
    dt = _check_dtype(dtype)
    wins = parse_windows(windows)
    arr = np.asarray(hu)
    is_float = arr.dtype.kind in "fc"
    src = _as_float32(arr)  # converted once, shared by all windows
    scale = 255.0 if dt == np.uint8 else 1.0
    out = np.empty((*arr.shape, len(wins)), dtype=dt)
    for c, win in enumerate(wins):
        out[..., c] = _finish(_window_f32(src, win, mode, scale), is_float)
    return out


# ---------------------------------------------------------------------------------------
# Lookup-table fast path for int16 HU.
#
# Row ``u`` of a LUT holds the output for the HU value whose int16 bit pattern is the
# uint16 ``u`` (so 0..32767 HU at rows 0..32767, then -32768..-1 HU at rows 32768..65535).
# That ordering lets apply_lut index with ``hu.view(np.uint16)``: no arithmetic, no int32
# temporary. Rows are zero-padded to 4 bytes (C <= 4) or 8 bytes (C <= 8) so the table can
# be read as one little-endian uint32/uint64 per row, and a single np.take gathers every
# channel at once. Measured on a 512x512 slice, np.take of 4-byte items is the fastest
# gather numpy has; 1- and 2-byte items and opaque 3-byte items are all slower, so even
# C = 1 or 2 gathers 4 bytes and narrows afterwards.

_LUT_ROWS = 65536
# Elements per np.take call: take converts its index array to intp (8 bytes per element),
# so chunking keeps that temporary in cache instead of allocating 4x the volume.
_CHUNK = 1 << 18


def _pack_width(channels: int) -> int | None:
    if channels <= 4:
        return 4
    if channels <= 8:
        return 8
    return None


@functools.lru_cache(maxsize=32)
def _cached_lut(windows: tuple[Window, ...], mode: str) -> np.ndarray:
    all_int16 = np.arange(_LUT_ROWS, dtype=np.uint16).view(np.int16)
    table = stack_windows(all_int16, list(windows), mode=mode, dtype=np.uint8)
    channels = len(windows)
    width = _pack_width(channels) or channels
    padded = np.zeros((_LUT_ROWS, width), dtype=np.uint8)
    padded[:, :channels] = table
    padded.setflags(write=False)
    lut = padded[:, :channels]
    lut.setflags(write=False)
    return lut


def window_lut(windows: WindowSpec = DEFAULT_WINDOWS, *, mode: str = "linear") -> np.ndarray:
    """uint8 lookup table ``[65536, C]`` giving every int16 HU value's windowed output.

    Row order is the uint16 view of the int16 value (see module notes): the row for HU
    value ``h`` is ``np.int16(h).view(np.uint16)``. Tables are cached and read-only; use
    them with ``apply_lut``.
    """
    _check_mode(mode)
    return _cached_lut(tuple(parse_windows(windows)), mode)


def _packed_table(lut: np.ndarray, width: int) -> np.ndarray:
    """The LUT as one little-endian uint{8*width} per row (channel 0 = lowest byte).

    A table from window_lut is a view of a zero-padded buffer, which is reused as is;
    any other table is padded here (a 256-512 KiB copy).
    """
    base = lut.base
    if (
        isinstance(base, np.ndarray)
        and base.dtype == np.uint8
        and base.shape == (_LUT_ROWS, width)
        and base.flags.c_contiguous
        and lut.strides == (width, 1)
        and lut.__array_interface__["data"][0] == base.__array_interface__["data"][0]
    ):
        padded = base
    elif lut.shape[1] == width and lut.flags.c_contiguous:
        padded = lut
    else:
        padded = np.zeros((_LUT_ROWS, width), dtype=np.uint8)
        padded[:, : lut.shape[1]] = lut
    return padded.view(f"<u{width}").reshape(_LUT_ROWS)


def _gather_packed(packed: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.empty(idx.size, dtype=packed.dtype)
    for start in range(0, idx.size, _CHUNK):
        stop = min(idx.size, start + _CHUNK)
        # mode="wrap" skips take's bounds-check buffering; uint16 indices are always valid.
        np.take(packed, idx[start:stop], out=out[start:stop], mode="wrap")
    return out


def _gather_compact(packed: np.ndarray, idx: np.ndarray, channels: int) -> np.ndarray:
    """Gather ``packed[idx]`` keeping the first ``channels`` bytes of each entry, densely.

    The obvious way to drop the pad byte, ``ascontiguousarray(out4[..., :3])``, is a
    byte-strided copy that costs ~6x the gather itself. Instead each 4-byte entry is stored
    through a uint32 view whose elements start every ``channels`` bytes: entry i's pad byte
    lands on entry i+1's first byte and is overwritten by the next (in-order) store; the
    last entry's pad spills into a spare tail byte that is sliced off.
    """
    n = idx.size
    width = packed.dtype.itemsize
    buf = np.empty(n * channels + (width - channels), dtype=np.uint8)
    dst = np.ndarray(shape=(n,), dtype=packed.dtype, buffer=buf, strides=(channels,))
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        dst[start:stop] = np.take(packed, idx[start:stop], mode="wrap")
    return buf[: n * channels]


def _gather_void(lut: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Fallback gather for any channel count: each row as one opaque C-byte item."""
    rows = np.ascontiguousarray(lut).view(f"V{lut.shape[1]}").reshape(_LUT_ROWS)
    return np.take(rows, idx, mode="wrap").view(np.uint8)


@functools.cache
def _overlapping_store_ok() -> bool:
    """Check once that this numpy stores a strided array in order (see _gather_compact).

    Holds for every numpy we know of; if a future one breaks it, apply_lut falls back to
    the slower void gather instead of returning wrong pixels.
    """
    rng = np.random.default_rng(0)
    lut = rng.integers(0, 256, size=(_LUT_ROWS, 3), dtype=np.uint8)
    padded = np.zeros((_LUT_ROWS, 4), dtype=np.uint8)
    padded[:, :3] = lut
    idx = rng.integers(0, _LUT_ROWS, size=_CHUNK + 1001, dtype=np.uint16)
    got = _gather_compact(padded.view("<u4").reshape(_LUT_ROWS), idx, 3)
    return bool(np.array_equal(got.reshape(-1, 3), lut[idx]))


def apply_lut(hu: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Window an int16 HU array through ``lut`` (from ``window_lut``): uint8 ``[..., C]``.

    Equal, bit for bit, to ``stack_windows(hu, windows, mode=mode, dtype=np.uint8)``. The
    result is a fresh C-contiguous array.
    """
    arr = np.asarray(hu)
    if arr.dtype != np.int16:
        raise TypeError(
            f"apply_lut needs int16 HU, got {arr.dtype}; use stack_windows for other types"
        )
    if lut.ndim != 2 or lut.shape[0] != _LUT_ROWS or lut.dtype != np.uint8 or lut.shape[1] < 1:
        raise ValueError(f"expected a uint8 [65536, C] table from window_lut, got {lut.shape}")
    channels = lut.shape[1]
    shape = (*arr.shape, channels)
    idx = np.ascontiguousarray(arr).view(np.uint16).reshape(-1)
    width = _pack_width(channels)
    if width is None or (channels != width and width == 8):
        # C > 8, or C = 5..7, where an overlapping 8-byte store hits numpy's slow
        # unaligned path: opaque-row gather.
        return _gather_void(lut, idx).reshape(shape)
    packed = _packed_table(lut, width)
    if channels == width:
        return _gather_packed(packed, idx).view(np.uint8).reshape(shape)
    if channels in (1, 2):
        # Truncating cast keeps the low bytes, i.e. channels 0..C-1 of the '<u4' entry.
        narrow = np.dtype("u1") if channels == 1 else np.dtype("<u2")
        return _gather_packed(packed, idx).astype(narrow).view(np.uint8).reshape(shape)
    if not _overlapping_store_ok():
        return _gather_void(lut, idx).reshape(shape)
    return _gather_compact(packed, idx, channels).reshape(shape)
