"""The scan record's findings: scan-level decisions, at the thresholds chosen for the scan."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ichscan.serve.processing import prediction_fields


def test_findings_are_decided_at_the_scan_thresholds() -> None:
    """The verdict ("Suspected ICH") is the scan's: it is decided at the thresholds the
    bundle chose for the scan score, not at the slice thresholds."""
    predictor = SimpleNamespace(
        labels=["any", "subdural"],
        thresholds=np.array([0.3, 0.3]),
        scan_thresholds=np.array([0.8, 0.2]),
        bundle=SimpleNamespace(config={}),
        backend=SimpleNamespace(has_study=False),
    )
    slices = np.array([[0.5, 0.25], [0.6, 0.1]], dtype=np.float32)
    fields = prediction_fields(predictor, slices, slices.max(axis=0))
    found = {f["label"]: (f["threshold"], f["positive"]) for f in fields["findings"]}
    assert found == {"any": (0.8, False), "subdural": (0.2, True)}
    assert fields["suspected_ich"] is False
