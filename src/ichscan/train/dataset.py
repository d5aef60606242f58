"""Torch datasets over a prepared cache: slices with their labels, windows or 2.5D input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ichscan.data.cache import PreparedCache

INPUT_KINDS = ("windows", "2.5d")


def neighbour_indices(index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the row of the previous and next slice of the same scan (itself at the
    ends), from scan_id and slice_index — vectorised, whatever the row order."""
    order = np.lexsort((index["slice_index"].to_numpy(), index["scan_id"].to_numpy()))
    scans = index["scan_id"].to_numpy()[order]
    prev_sorted = np.roll(order, 1)
    next_sorted = np.roll(order, -1)
    same_prev = np.concatenate([[False], scans[1:] == scans[:-1]])
    same_next = np.concatenate([scans[:-1] == scans[1:], [False]])
    prev = np.empty(len(order), dtype=np.int64)
    nxt = np.empty(len(order), dtype=np.int64)
    prev[order] = np.where(same_prev, prev_sorted, order)
    nxt[order] = np.where(same_next, next_sorted, order)
    return prev, nxt


class SliceDataset(Dataset):
    """Rows `rows` of a prepared cache → (uint8 tensor [3, H, W], float labels [L]).

    `windows`: the cached window channels (a single grey channel is replicated to 3).
    `2.5d`: the slice and its two neighbours in the first cached window (the RSNA 2019
    winners' input), so the network sees the z context of a thin bleed.
    """

    def __init__(
        self,
        cache: PreparedCache,
        rows: np.ndarray,
        *,
        input_kind: str = "windows",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input must be one of {INPUT_KINDS}, got {input_kind!r}")
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = cache.labels().astype(np.float32)
        self.input_kind = input_kind
        self.augment = augment
        if input_kind == "2.5d":
            self.prev, self.next = neighbour_indices(cache.index)

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, row: int) -> np.ndarray:
        """uint8 [H, W, 3] for one cache row."""
        if self.input_kind == "2.5d":
            return np.stack(
                [
                    self.cache[self.prev[row]][..., 0],
                    self.cache[row][..., 0],
                    self.cache[self.next[row]][..., 0],
                ],
                axis=-1,
            )
        x = self.cache[row]
        if x.shape[-1] == 1:
            return np.repeat(x, 3, axis=-1)
        if x.shape[-1] == 2:
            return np.concatenate([x, x[..., :1]], axis=-1)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.rows[i])
        x = torch.from_numpy(np.ascontiguousarray(self.image(row).transpose(2, 0, 1)))
        if self.augment is not None:
            x = self.augment(x)
        return x, torch.from_numpy(self.labels[row])
