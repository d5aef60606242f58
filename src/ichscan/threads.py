"""Torch's intra-op thread count, set for a block and put back after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads. Small tensors (a MIL head's batches, a test's
    toy model) finish sooner on one thread: OpenMP's hand-offs cost more than the second
    core computes, 4x on a busy 2-core machine (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
