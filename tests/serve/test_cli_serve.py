"""``ichscan serve``: the options reach the app and uvicorn (uvicorn itself is replaced, so no
port is opened), the token comes from --token or ICHSCAN_TOKEN, bad usage is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_helpers import TestClient

from ichscan.cli import main

pytest_plugins = ["serve_fixtures"]
pytestmark = [pytest.mark.usefixtures("single_threaded_torch"), pytest.mark.timeout(120)]


@pytest.fixture
def served(monkeypatch) -> dict[str, Any]:
    """What uvicorn.run was called with."""
    import uvicorn

    calls: dict[str, Any] = {}

    def fake_run(app, **kwargs):
        calls["app"] = app
        calls.update(kwargs)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("ICHSCAN_TOKEN", raising=False)
    return calls


def test_serve_binds_loopback_by_default(served, trained_bundle: Path, tmp_path: Path) -> None:
    code = main(["serve", "--model", str(trained_bundle), "--data", str(tmp_path / "d")])
    assert code == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8000
    with TestClient(served["app"]) as client:
        health = client.get("/api/health").json()
        assert health["model"] is True and health["token_required"] is False
        assert client.get("/api/model").json()["architecture"] == "resnet18"
    assert (tmp_path / "d" / "scans").is_dir()


def test_token_from_the_environment(served, trained_bundle: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ICHSCAN_TOKEN", "from-env")
    assert main(["serve", "--model", str(trained_bundle), "--data", str(tmp_path)]) == 0
    with TestClient(served["app"]) as client:
        assert client.get("/api/scans").status_code == 401
        ok = client.get("/api/scans", headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200


def test_token_option_wins(served, trained_bundle: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ICHSCAN_TOKEN", "from-env")
    args = ["serve", "--model", str(trained_bundle), "--data", str(tmp_path), "--token", "opt"]
    assert main(args) == 0
    with TestClient(served["app"]) as client:
        assert client.get("/api/scans", headers={"Authorization": "Bearer opt"}).status_code == 200
        env = client.get("/api/scans", headers={"Authorization": "Bearer from-env"})
        assert env.status_code == 401


def test_open_host_without_token_warns(served, trained_bundle: Path, tmp_path, capsys) -> None:
    args = ["serve", "--model", str(trained_bundle), "--data", str(tmp_path), "--host", "0.0.0.0"]
    assert main([*args, "--port", "9000"]) == 0
    assert served["host"] == "0.0.0.0" and served["port"] == 9000
    assert "without a token" in capsys.readouterr().err


def test_startup_line_says_what_the_model_was_trained_on(
    served, trained_bundle: Path, tmp_path: Path, capsys
) -> None:
    """S-1: predict's words on the training data, loud for synthetic phantoms."""
    import json

    from ichscan.models.bundle import trained_on

    words = trained_on(json.loads((trained_bundle / "bundle.json").read_text()))
    assert main(["serve", "--model", str(trained_bundle), "--data", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert f"Model trained on {words}: its findings on real CT mean nothing." in err
    assert "Research software, not a medical device." in err


def test_store_only(served, tmp_path: Path, capsys) -> None:
    (tmp_path / "store").mkdir()
    args = ["serve", "--store", str(tmp_path / "store"), "--data", str(tmp_path / "d")]
    assert main(args) == 0
    with TestClient(served["app"]) as client:
        assert client.get("/api/worklist").json() == {"studies": [], "problems": []}
        assert client.get("/api/health").json()["model"] is False
    assert "trained on" not in capsys.readouterr().err  # no model, nothing to say about it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a model (--model) or a receiver store (--store)"),
        (["--model", "{tmp}/nothing"], "nothing"),
        (["--store", "{tmp}/nothing"], "the store folder does not exist"),
        (["--store", "{tmp}", "--max-upload-mb", "0"], "--max-upload-mb must be positive"),
        (["--store", "{tmp}", "--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_usage_is_one_line(served, tmp_path: Path, capsys, args, message: str) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["serve", "--data", str(tmp_path / "d"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ichscan serve: error:") and message in err
    assert len(err.splitlines()) == 1
    assert "app" not in served
