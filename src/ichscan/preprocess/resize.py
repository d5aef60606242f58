"""Resize CT slices in-plane with Pillow, one slice at a time.

Filters:

- Shrinking (neither output side larger than the input side): area averaging, i.e. each
  output pixel is the mean of the input pixels it covers. That is the antialiased choice
  for a downsample (a plain bilinear sample would alias the fine texture of bone and
  noise). Exact integer factors (512 -> 256) use ``Image.reduce``, the same box average
  computed ~3.5x faster; it can differ from ``Image.resize(BOX)`` by one uint8 rounding
  step. Other factors use ``Image.resize(..., BOX)``.
- Anything else (enlarging either side): ``BILINEAR``, which Pillow still antialiases
  along a side that shrinks.

Pillow beats ``scipy.ndimage.zoom`` (measured 512 -> 256 float32: 0.25 ms vs 2.5 ms) and
handles uint8 RGB natively. Slices with 3 uint8 channels go through mode ``RGB`` in one
call; any other channel count is resized channel by channel in mode ``L`` (uint8) or ``F``
(float32). Pillow's 4-channel mode RGBA is avoided on purpose: it premultiplies by the
fourth channel when resampling, which would corrupt a fourth window.

Non-square input is squashed to the requested size (the aspect ratio changes) unless
``keep_aspect=True``, which first pads the slice, centered, to the output aspect ratio
(square for an int size) with the minimum value of each channel, then resizes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_slice", "resize_slices"]

_NATIVE = (np.dtype(np.uint8), np.dtype(np.float32))


def _target(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        out = (int(size), int(size))
    else:
        h, w = size
        out = (int(h), int(w))
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"resize target must be positive, got {size!r}")
    return out


def _pad_amounts(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Rows and columns to add so that (h, w) gets the aspect ratio of (out_h, out_w)."""
    # Compare h/w with out_h/out_w without floats.
    if h * out_w < w * out_h:
        return round(w * out_h / out_w) - h, 0
    return 0, round(h * out_w / out_h) - w


def _pad(image: np.ndarray, rows: int, cols: int, value: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    out = np.empty((h + rows, w + cols, *image.shape[2:]), dtype=image.dtype)
    out[...] = value  # per-channel value broadcasts over the trailing axis
    top, left = rows // 2, cols // 2
    out[top : top + h, left : left + w] = image
    return out


def _resize_plane(plane: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize one C-contiguous 2-D uint8/float32 plane or one HxWx3 uint8 image."""
    h, w = plane.shape[:2]
    image = Image.fromarray(plane)
    if out_h <= h and out_w <= w:
        if h % out_h == 0 and w % out_w == 0:
            resized = image.reduce((w // out_w, h // out_h))
        else:
            resized = image.resize((out_w, out_h), Image.Resampling.BOX)
    else:
        resized = image.resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _resize_into(image: np.ndarray, out: np.ndarray) -> None:
    """Resize a native-dtype [H, W] or [H, W, C] slice into ``out`` ([h, w] or [h, w, C])."""
    out_h, out_w = out.shape[:2]
    if image.shape[:2] == (out_h, out_w):
        out[...] = image
    elif image.ndim == 2 or (image.shape[2] == 3 and image.dtype == np.uint8):
        out[...] = _resize_plane(np.ascontiguousarray(image), out_h, out_w)
    else:
        for c in range(image.shape[2]):
            out[..., c] = _resize_plane(np.ascontiguousarray(image[..., c]), out_h, out_w)


def _resize_stack(volume: np.ndarray, size: int | tuple[int, int], keep_aspect: bool) -> np.ndarray:
    """Core of both public functions: ``volume`` is [S, H, W] or [S, H, W, C]."""
    out_h, out_w = _target(size)
    dtype = volume.dtype
    if dtype.kind not in "uif":
        raise TypeError(f"cannot resize a {dtype} volume")
    # Work in a dtype Pillow resamples natively; others go through float32 and back.
    work = volume if dtype in _NATIVE else volume.astype(np.float32)
    pad_value = None
    rows = cols = 0
    if keep_aspect and volume.shape[0] > 0:
        rows, cols = _pad_amounts(volume.shape[1], volume.shape[2], out_h, out_w)
        if rows or cols:
            # One value for the whole volume (per channel) so every slice pads alike.
            pad_value = work.min(axis=(0, 1, 2))
    out = np.empty((volume.shape[0], out_h, out_w, *volume.shape[3:]), dtype=work.dtype)
    for s in range(volume.shape[0]):
        image = work[s]
        if pad_value is not None:
            image = _pad(image, rows, cols, pad_value)
        _resize_into(image, out[s])
    if out.dtype == dtype:
        return out
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    return out.astype(dtype)


def resize_slices(
    volume: np.ndarray, size: int | tuple[int, int], *, keep_aspect: bool = False
) -> np.ndarray:
    """Resize every slice of ``[S, H, W]`` or ``[S, H, W, C]`` to ``size`` (int or (h, w)).

    Returns a new array ``[S, h, w(, C)]`` of the input dtype. uint8 and float32 resize
    natively; other dtypes are resampled in float32 and cast back (integers rounded and
    clipped to their range). See the module notes for filters and ``keep_aspect``.
    """
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4):
        raise ValueError(f"expected [S, H, W] or [S, H, W, C], got shape {vol.shape}")
    return _resize_stack(vol, size, keep_aspect)


def resize_slice(
    image: np.ndarray, size: int | tuple[int, int], *, keep_aspect: bool = False
) -> np.ndarray:
    """Resize one slice ``[H, W]`` or ``[H, W, C]`` to ``size``; same rules as resize_slices.

    With ``keep_aspect`` the pad value is the minimum of this slice (per channel).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [H, W, C], got shape {img.shape}")
    return _resize_stack(img[np.newaxis], size, keep_aspect)[0]
