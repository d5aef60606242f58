"""PNG/JPEG slices: already windowed display values, kept as such (never read as HU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ichscan.errors import InputError
from ichscan.scan import Scan

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
# A CT slice is 512x512 to 2048x2048; 8192x8192 leaves room for scanned film and
# screenshots, and stays below Pillow's own bomb warning (89 Mpx), so an image refused here
# never gets as far as decoding.
MAX_SLICE_PIXELS = 8192 * 8192


def read_grey(path: str | Path) -> np.ndarray:
    """Any PNG/JPEG (grey, grey+alpha, RGB, RGBA, 16-bit) → uint8 [rows, cols]."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 Mpx on; the size check below refuses those images anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            _check_size(path, img.size)
            img.load()
            return to_grey(img)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Image.DecompressionBombError:
        # Pillow refuses above 179 Mpx while it opens, before the size can be read.
        raise InputError(
            path,
            f"image is too large for a CT slice: its header claims more than "
            f"{2 * (Image.MAX_IMAGE_PIXELS or MAX_SLICE_PIXELS):,} pixels (a decompression bomb?)",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"not a readable image ({exc})") from None


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_SLICE_PIXELS:
        raise InputError(
            path,
            f"image of {width}x{height} pixels is too large for a CT slice (at most "
            f"{MAX_SLICE_PIXELS:,} pixels; a decompression bomb?)",
        )


def to_grey(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) or 1.0
        return np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8)
    if "A" in img.getbands() or img.mode == "P":
        # Transparent parts are background, which in a head CT slice is black air.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def read_image(path: str | Path, *, window: str = "unknown") -> Scan:
    """One slice as a Scan whose values are display values in `window` (say it if known)."""
    path = Path(path)
    grey = read_grey(path)
    return Scan(
        hu=grey[np.newaxis],
        affine=np.eye(4),
        slice_ids=[path.stem],
        spacing=(1.0, 1.0, 1.0),
        patient_id=path.stem,
        study_uid=path.stem,
        series_uid=path.stem,
        source=str(path),
        windowed=window,
        metadata={"format": "image"},
        warnings=[]
        if window != "unknown"
        else ["image slice: values are display values in an unknown window, not HU"],
    )
