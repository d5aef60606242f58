"""`ichscan listen` on bad options: one line naming the problem, exit status 2."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from ichscan.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))

pytest_plugins = ["infer_fixtures"]
pytestmark = pytest.mark.timeout(120)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["listen", *args])
    return code, capsys.readouterr().err.strip()


def test_missing_model(capsys, tmp_path: Path) -> None:
    code, err = _run(capsys, "--model", str(tmp_path / "nope"), "--store", str(tmp_path / "s"))
    assert code == 2
    assert err == f"ichscan listen: error: {tmp_path / 'nope'}: model folder not found"
    assert not (tmp_path / "s").exists(), "nothing is made before the model loads"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--forward", "PACS-10.0.0.5-104", "expected AET@HOST:PORT"),
        ("--series-timeout", "0", "--series-timeout must be positive"),
        ("--workers", "0", "--workers must be at least 1"),
        ("--ae-title", "A_VERY_LONG_AE_TITLE", "1 to 16 characters"),
        ("--allow-ae", "GOOD,WAY_TOO_LONG_AE_TITLE", "AE titles are 1 to 16 characters"),
    ],
)
def test_bad_option_is_one_line(capsys, tmp_path: Path, option, value, message) -> None:
    code, err = _run(capsys, "--model", str(tmp_path), option, value)
    assert code == 2 and message in err and "\n" not in err


def test_port_in_use(capsys, tmp_path: Path, trained_bundle: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = _run(
            capsys,
            "--model",
            str(trained_bundle),
            "--store",
            str(tmp_path / "s"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
        )
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err.splitlines()[-1]
