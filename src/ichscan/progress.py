"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm, except that when its stream is not a terminal (CI, nohup, a benchmark's log) it
    redraws at most every 30 s: tqdm redraws several times a second, and a log would keep
    every redraw (thousands of lines per step)."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
