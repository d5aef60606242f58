"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and
small synthetic DICOM series built with ichscan's own writer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

# Helper modules imported by name from test files in other folders (the web tests use
# infer_fixtures' tiny model and BleedDetector): importable whichever folder runs first,
# with their asserts rewritten.
sys.path.insert(0, str(Path(__file__).parent / "infer"))
pytest.register_assert_rewrite("infer_fixtures", "serve_helpers")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it lives beside the checkout in ../shared)")
    return path


@pytest.fixture
def rsna_dicom_dir() -> Path:
    return shared("rsna_dicom")


@pytest.fixture
def head_ct_dir() -> Path:
    return shared("head_ct")


@pytest.fixture
def ramp_volume() -> np.ndarray:
    """Small HU volume whose every voxel is predictable: value = 10*slice + row - 500."""
    s, r, c = 6, 32, 24
    vol = (10 * np.arange(s)[:, None, None] + np.arange(r)[None, :, None] - 500) * np.ones(
        (1, 1, c)
    )
    return vol.astype(np.int16)


@pytest.fixture
def phantom_volume() -> np.ndarray:
    from ichscan.data.phantom import make_head_phantom

    hu, _ = make_head_phantom((12, 64, 64), (5.0, 3.6, 3.6), seed=1)
    return hu


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch  # only when a GPU test is collected: torch is slow to import

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
