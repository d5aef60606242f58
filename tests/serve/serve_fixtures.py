"""Fixtures for the web app tests: apps made with ``create_app`` around the tiny model the
inference tests train once per session, and small synthetic series to upload.

Loaded as a plugin (``pytest_plugins = ["serve_fixtures"]``), not as a conftest.py, for the
reason infer_fixtures.py gives; it pulls infer_fixtures in the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))

from serve_helpers import TestClient

pytest_plugins = ["infer_fixtures"]


@pytest.fixture(scope="session")
def series_dir(synth_dicom: Path) -> Path:
    """One synthetic 8-slice 64x64 DICOM series (a folder of .dcm files)."""
    return sorted(p.parent for p in synth_dicom.glob("*/*/*.dcm"))[0]


@pytest.fixture(scope="session")
def bleed_series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-slice 64x64 series with an intraparenchymal and a subdural bleed."""
    from ichscan.data.phantom import make_phantom
    from ichscan.io.dicom_write import write_ct_series

    phantom = make_phantom(
        (8, 64, 64), (5.0, 3.6, 3.6), seed=7, findings=["intraparenchymal", "subdural"]
    )
    out = tmp_path_factory.mktemp("bleed") / "series"
    write_ct_series(
        phantom.hu,
        out,
        pixel_spacing=(3.6, 3.6),
        patient_id="BLEED01",
        series_description="Head 5mm bleed (synthetic)",
    )
    return out


@pytest.fixture(scope="session")
def served_predictor(trained_bundle: Path) -> Any:
    """The tiny bundle loaded once for every app in the session."""
    from ichscan.infer.predictor import Predictor

    return Predictor(trained_bundle, device="cpu")


@pytest.fixture
def make_client(tmp_path: Path, served_predictor: Any) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**create_app kwargs)``: a started TestClient (workers running) on a
    fresh data folder under tmp_path unless ``data_dir`` is given; closed at teardown."""
    from ichscan.serve import create_app

    clients: list[TestClient] = []

    def make(**kwargs: Any) -> TestClient:
        kwargs.setdefault("predictor", served_predictor)
        kwargs.setdefault("inline_wait_s", 10.0)
        data_dir = kwargs.pop("data_dir", tmp_path / f"data{len(clients)}")
        model_dir = kwargs.pop("model_dir", None)
        client = TestClient(create_app(model_dir, data_dir, **kwargs))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
