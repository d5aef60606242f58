"""The Python API the README documents: `import ichscan` is light, the model verbs work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import ichscan

pytest_plugins = ["infer_fixtures"]


def test_import_ichscan_needs_no_torch() -> None:
    """Data work (load, discover, write_nifti) must not pay torch's import."""
    code = "import sys, ichscan; ichscan.load; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_name_in_all_resolves() -> None:
    for name in ichscan.__all__:
        assert getattr(ichscan, name) is not None


def test_predict_a_scan_from_python(trained_bundle: Path, synth_dicom: Path) -> None:
    """The README's example: a bundle, a scan, its probabilities and decisions."""
    model = ichscan.Predictor(trained_bundle, device="cpu")
    result = model.predict_scan(ichscan.load(synth_dicom))
    assert isinstance(result, ichscan.ScanPrediction)
    assert result.scan_probs.shape == (len(result.labels),)
    assert result.slice_probs.shape == (result.n_slices, len(result.labels))
    assert result.scan_positive.dtype == np.bool_
    # a batch: every series of the folder, and the bad input as (path, error), not a raise
    batch = list(ichscan.predict_paths([synth_dicom, synth_dicom / "nothing-here"], model))
    assert all(isinstance(r, ichscan.ScanPrediction) for r in batch[:-1]) and len(batch) == 7
    assert isinstance(batch[-1], tuple) and isinstance(batch[-1][1], ichscan.IchscanError)
