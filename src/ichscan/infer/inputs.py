"""A Scan → the uint8 tensor a slice model reads, built only from the bundle's input spec.

The spec (written by training into ``bundle.json["input"]``) says which windows make the
channels, whether the input is 2.5D, the size, and, for a model trained on PNG slices, the
display window those PNGs were in (``source_window``). Every step here mirrors what the
training cache did for the same file (:mod:`ichscan.data.prepare`), so a slice predicted
from a DICOM series gives the network the very pixels it would have seen in training:

- DICOM: HU → window lookup table → resize in PIL's RGBX mode, box-averaged ``reduce`` for
  a square slice and an integer factor, else bilinear (as
  :func:`ichscan.preprocess.slice_input.stored_to_input`).
- NIfTI and images: windowed (images already are), then
  :func:`ichscan.preprocess.resize.resize_slices` (as ``prepare`` does with
  ``resize_slice``).

Channel assembly follows :class:`ichscan.train.dataset.SliceDataset`: one window is grey
replicated to 3 channels, two windows repeat the first as the third, 2.5D stacks the
previous, current and next slice of the first window (the slice itself at either end). A
``brain+head`` crop (the small-set ensemble's) gives two planes of the one brain window, the
brain and the whole head, which the same rule makes brain, head, brain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ichscan.errors import InputError
from ichscan.preprocess.head_crop import CROP_VERSION, CROPS, crop_slice
from ichscan.preprocess.resize import resize_slice, resize_slices
from ichscan.preprocess.window import (
    Window,
    apply_lut,
    parse_windows,
    stack_windows,
    window_lut,
)
from ichscan.scan import Scan

log = logging.getLogger(__name__)

__all__ = ["InputSpec", "scan_to_model_input"]

INPUT_KINDS = ("windows", "2.5d")


@dataclass(frozen=True)
class InputSpec:
    """The preprocessing half of a bundle: what `scan_to_model_input` needs, parsed once."""

    kind: str
    windows: tuple[Window, ...]
    mode: str
    size: int
    source_window: str | None
    crop: str = "none"

    @classmethod
    def from_bundle(cls, spec: dict[str, Any]) -> InputSpec:
        kind = str(spec.get("kind", "windows"))
        if kind not in INPUT_KINDS:
            raise ValueError(f"bundle input kind {kind!r} is not one of {INPUT_KINDS}")
        windows = tuple(
            Window(str(w["name"]), float(w["center"]), float(w["width"])) for w in spec["windows"]
        )
        if not windows:
            raise ValueError("bundle input names no window")
        source = spec.get("source_window") or None
        crop = str(spec.get("crop", "none"))
        if crop not in CROPS:
            raise ValueError(f"bundle input crop {crop!r} is not one of {CROPS}")
        version = spec.get("crop_version") or 1
        if crop != "none" and int(version) != CROP_VERSION:
            log.warning(
                "this bundle was trained on slices cut by head crop version %s; this ichscan "
                "cuts with version %s, so its probabilities can shift a little (retrain to "
                "match)",
                version,
                CROP_VERSION,
            )
        return cls(kind, windows, str(spec.get("mode", "linear")), int(spec["size"]), source, crop)

    @property
    def read_windows(self) -> tuple[Window, ...]:
        """The windows rendered from HU: only the first for 2.5D (it stacks neighbours)."""
        return self.windows[:1] if self.kind == "2.5d" else self.windows

    @property
    def needs_hu(self) -> bool:
        """True when the channels are distinct HU windows, which a display image (already in
        one window) cannot give. A model trained on windowed PNGs never needs HU."""
        return self.source_window is None and len(self.read_windows) > 1


def _resize_rgbx(planes: np.ndarray, size: int) -> np.ndarray:
    """[S, H, W, C<=3] uint8 → [S, size, size, C] exactly as the DICOM training path resized:
    PIL in RGBX mode, ``reduce`` for a square slice and an integer factor, else bilinear."""
    s, rows, cols, c = planes.shape
    if (rows, cols) == (size, size):
        return planes
    rgbx = np.zeros((rows, cols, 4), dtype=np.uint8)
    out = np.empty((s, size, size, c), dtype=np.uint8)
    exact = rows == cols and rows % size == 0
    for k in range(s):
        rgbx[..., :c] = planes[k]
        img = Image.frombuffer("RGBX", (cols, rows), rgbx, "raw", "RGBX", 0, 1)
        img = img.reduce(rows // size) if exact else img.resize((size, size), Image.BILINEAR)
        out[k] = np.asarray(img)[..., :c]
    return out


def _windowed_planes(scan: Scan, spec: InputSpec) -> np.ndarray:
    """[S, H, W, C] uint8 display values: C windows rendered from HU, or the stored grey."""
    if scan.windowed:
        if spec.needs_hu:
            raise InputError(
                scan.source or "image",
                "this image is already windowed; the model needs HU for its "
                f"{'/'.join(w.name for w in spec.read_windows[1:])} windows "
                "(give it the DICOM series or a NIfTI volume)",
            )
        return np.asarray(scan.hu, dtype=np.uint8)[..., np.newaxis]
    windows = list(spec.read_windows)
    if spec.source_window:
        # Trained on PNGs in this display window: render the same window from HU.
        windows = parse_windows(spec.source_window)
    if scan.hu.dtype == np.int16:
        return apply_lut(scan.hu, window_lut(windows, mode=spec.mode))
    return stack_windows(scan.hu, windows, mode=spec.mode)


def model_channels(planes: np.ndarray, spec: InputSpec) -> np.ndarray:
    """[S, h, w, C] → [S, h, w, 3] the way SliceDataset assembles a training sample (a
    ``brain+head`` crop's two planes as brain, head, brain)."""
    if spec.kind == "2.5d":
        grey = planes[..., 0]
        n = grey.shape[0]
        prev = np.maximum(np.arange(n) - 1, 0)
        nxt = np.minimum(np.arange(n) + 1, n - 1)
        return np.stack([grey[prev], grey, grey[nxt]], axis=-1)
    c = planes.shape[-1]
    if c == 1:
        return np.repeat(planes, 3, axis=-1)
    if c == 2:
        return np.concatenate([planes, planes[..., :1]], axis=-1)
    return planes[..., :3]


def scan_to_model_input(scan: Scan, bundle_input: dict[str, Any] | InputSpec) -> np.ndarray:
    """uint8 ``[S, 3, size, size]`` for every slice of ``scan``, preprocessed exactly as the
    bundle's training data was (see the module notes). Raises InputError for a windowed
    image when the model reads distinct HU windows."""
    spec = (
        bundle_input if isinstance(bundle_input, InputSpec) else InputSpec.from_bundle(bundle_input)
    )
    planes = _windowed_planes(scan, spec)
    if spec.crop != "none":
        # Crop at full resolution, then resize each square: what prepare stored in training.
        small = np.stack([resize_slice(crop_slice(p, spec.crop), spec.size) for p in planes])
    elif scan.metadata.get("format") == "dicom" and planes.shape[-1] <= 3:
        small = _resize_rgbx(planes, spec.size)
    else:
        small = resize_slices(planes, spec.size)
    x = model_channels(small, spec)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
