"""Preprocessing for head CT: windowing, in-plane resizing, tilt-correcting reslicing and
slice selection. Small, vectorised numpy functions on the hot path of training and
inference."""

from __future__ import annotations

from ichscan.preprocess.resize import resize_slice, resize_slices
from ichscan.preprocess.reslice import reslice, reslice_scan
from ichscan.preprocess.select import middle_slices, select_scan, select_slices
from ichscan.preprocess.window import (
    DEFAULT_WINDOWS,
    WINDOWS,
    Window,
    apply_lut,
    apply_window,
    parse_windows,
    stack_windows,
    window_lut,
)

__all__ = [
    "DEFAULT_WINDOWS",
    "WINDOWS",
    "Window",
    "apply_lut",
    "apply_window",
    "middle_slices",
    "parse_windows",
    "resize_slice",
    "resize_slices",
    "reslice",
    "reslice_scan",
    "select_scan",
    "select_slices",
    "stack_windows",
    "window_lut",
]
