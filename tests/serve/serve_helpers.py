"""Plain helpers for the web app tests (no fixtures here: see serve_fixtures.py)."""

from __future__ import annotations

import io
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


class BleedDetector(nn.Module):
    """A hand-built slice model (as in tests/infer/test_explain.py) whose logit is the mean
    of relu(10 * brain - 20 * bone): positive on acute blood, not on brain, CSF, air or bone.
    A one-epoch 32-pixel model gives all-zero Grad-CAM maps; this one lights the bleed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([10.0, 0.0, -20.0]).view(1, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.act(self.conv(x)).mean(dim=(2, 3))


def bleed_explainer(labels: list[str]) -> Any:
    """A GradCamExplainer over BleedDetector, to put in place of the app's."""
    from ichscan.infer.explain import GradCamExplainer

    model = BleedDetector().eval()
    return GradCamExplainer([model], [model.act], labels)
