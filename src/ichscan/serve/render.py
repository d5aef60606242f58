"""One slice as a PNG: HU through a window preset, optionally with the Grad-CAM heat blended
in. A slice uploaded as a PNG/JPEG is already display values in one window; other windows
cannot be recovered from it, so it is shown as it is and the response says which window."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ichscan.infer.explain import overlay
from ichscan.preprocess.window import apply_window

WINDOW_PRESETS = {"brain": "brain", "subdural": "subdural", "bone": "bone", "soft": "soft_tissue"}


def shown_window(window: str, windowed: str | None) -> str:
    """The window a rendered slice is in: the one asked for, or the upload's own."""
    return f"{windowed} (as uploaded)" if windowed else window


def grey_slice(plane: np.ndarray, window: str, windowed: str | None) -> np.ndarray:
    """uint8 [rows, cols]: HU through the window preset, or the uploaded display values."""
    if windowed:
        return np.asarray(plane, dtype=np.uint8)
    return apply_window(np.asarray(plane), WINDOW_PRESETS[window])


def png_bytes(grey: np.ndarray, heat: np.ndarray | None = None) -> bytes:
    image = overlay(grey, heat) if heat is not None else Image.fromarray(grey)
    buffer = io.BytesIO()
    # Level 1: a third of the time of the default for a few percent more bytes, and these
    # are cached after the first request anyway.
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
