"""Plain helpers for the web app tests (no fixtures here: see serve_fixtures.py)."""

from __future__ import annotations

import io
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

from infer_fixtures import BleedDetector

with warnings.catch_warnings():
    # Starlette prefers the httpx2 package for its test client; httpx works the same here.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

Files = list[tuple[str, tuple[str, bytes, str]]]
RSNA = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def dicom_files(folder: Path) -> Files:
    return [
        ("files", (p.name, p.read_bytes(), "application/dicom"))
        for p in sorted(folder.glob("*.dcm"))
    ]


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def series_zip(folder: Path) -> bytes:
    return zip_bytes({f"study/{p.name}": p.read_bytes() for p in sorted(folder.glob("*.dcm"))})


def wait_done(client: TestClient, scan_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/api/scans/{scan_id}").json()
        if record["status"] in ("done", "failed") or time.monotonic() > deadline:
            return record
        time.sleep(0.05)


def bleed_explainer(labels: list[str]) -> Any:
    """A GradCamExplainer over BleedDetector, to put in place of the app's."""
    from ichscan.infer.explain import GradCamExplainer

    model = BleedDetector().eval()
    return GradCamExplainer([model], [model.act], labels)
