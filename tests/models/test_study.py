"""The study model: a scan's outputs do not depend on the padding of the batch it is in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ichscan.models.study import StudyModel


@pytest.mark.parametrize("kind", ["gru", "conv"])
def test_a_scan_reads_the_same_alone_and_padded_in_a_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = StudyModel(8, 3, kind=kind, hidden=16).eval()
    lengths = [5, 12, 3]
    scans = [torch.randn(n, 8) for n in lengths]
    batch = torch.zeros(len(scans), max(lengths), 8)
    mask = torch.zeros(len(scans), max(lengths), dtype=torch.bool)
    for i, s in enumerate(scans):
        batch[i, : len(s)] = s + 0  # padding left at zero
        batch[i, len(s) :] = 7.0  # and garbage there must not matter either
        mask[i, : len(s)] = True
    with torch.no_grad():
        slices, scan = model(batch, mask)
        for i, s in enumerate(scans):
            alone_slices, alone_scan = model(s[None])
            np.testing.assert_allclose(slices[i, : len(s)], alone_slices[0], atol=1e-5)
            np.testing.assert_allclose(scan[i], alone_scan[0], atol=1e-5)
