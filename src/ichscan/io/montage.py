"""Preview montages: a grid of slices (columns) in each window (rows), labelled, as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ichscan.scan import Scan

TILE = 192


def text_on_band(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    fill: int | tuple[int, ...] = 255,
    band: int | tuple[int, ...] = 0,
) -> None:
    """Text on a dark band: white letters over the skull (white in every brain window, and
    in a tight crop's corners) vanish, and with them a slice's number or probability."""
    left, top, right, bottom = draw.textbbox(xy, text)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=band)
    draw.text(xy, text, fill=fill)


def preview_indices(n_slices: int, n: int) -> np.ndarray:
    """n slices spread evenly over the volume, skipping the first and last tenth (mostly
    neck and vertex, where there is little to see)."""
    if n >= n_slices:
        return np.arange(n_slices)
    lo, hi = int(n_slices * 0.1), max(int(n_slices * 0.9) - 1, int(n_slices * 0.1))
    if hi - lo + 1 < n:
        lo, hi = 0, n_slices - 1
    return np.unique(np.linspace(lo, hi, n).round().astype(int))


def montage(
    scan: Scan, windows: Sequence[str] = ("brain", "subdural", "bone"), n_slices: int = 8
) -> Image.Image:
    from ichscan.preprocess.window import apply_window, parse_windows

    idx = preview_indices(scan.n_slices, n_slices)
    if scan.windowed:
        rows = [(f"as stored ({scan.windowed} window)", scan.hu[idx].astype(np.uint8))]
    else:
        rows = [
            (f"{w.name} {w.center:g}/{w.width:g}", apply_window(scan.hu[idx], w))
            for w in parse_windows(list(windows))
        ]
    sheet = Image.new("L", (TILE * len(idx), TILE * len(rows)), 0)
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        for c, k in enumerate(idx):
            tile = Image.fromarray(images[c]).resize((TILE, TILE), Image.BILINEAR)
            sheet.paste(tile, (c * TILE, r * TILE))
            text_on_band(draw, (c * TILE + 4, r * TILE + 4), f"{k}")
        text_on_band(draw, (4, r * TILE + TILE - 14), label)
    return sheet


def write_preview(
    scan: Scan,
    out: str | Path,
    windows: Sequence[str] = ("brain", "subdural", "bone"),
    n_slices: int = 8,
) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    montage(scan, windows, n_slices).save(out)
    return out
