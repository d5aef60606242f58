"""``ichscan serve``: the app from :func:`create_app` under uvicorn."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from ichscan.serve.uploads import Limits

TOKEN_ENV = "ICHSCAN_TOKEN"
SYNTHETIC_WARNING = ": its findings on real CT mean nothing"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_line(
    host: str, port: int, data: str, store: str | None, config: dict[str, Any] | None
) -> str:
    """The server's start-up line: where it listens, and what the served model (``config``:
    its bundle's, None without a model) was trained on, in ``predict``'s words."""
    from ichscan.models.bundle import is_synthetic_line, trained_on

    shown = f"[{host}]" if ":" in host else host
    line = (
        f"ichscan serve: http://{shown}:{port}/ (API docs at /docs; data in {data}"
        + (f"; worklist from {store}" if store else "")
        + "). Research software, not a medical device."
    )
    if config is not None:
        words = trained_on(config)
        line += f" Model trained on {words}"
        if is_synthetic_line(words):
            line += SYNTHETIC_WARNING
        line += "."
    return line


def run_server(
    *,
    model: str | None,
    store: str | None,
    data: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    workers: int = 1,
    max_upload_mb: float = 1024.0,
    inline_wait_s: float = 1.0,
    device: str = "auto",
) -> int:
    import uvicorn

    from ichscan.errors import IchscanError
    from ichscan.serve.app import create_app

    token = token or os.environ.get(TOKEN_ENV) or None
    if max_upload_mb <= 0:
        raise IchscanError(None, f"--max-upload-mb must be positive, not {max_upload_mb:g}")
    if workers < 1:
        raise IchscanError(None, f"--workers must be at least 1, not {workers}")
    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024**2))
    app = create_app(
        model,
        Path(data),
        token=token,
        store=store,
        limits=limits,
        workers=workers,
        inline_wait_s=inline_wait_s,
        device=device,
    )
    if not is_loopback(host) and token is None:
        print(
            f"warning: serving on {host} without a token: anyone who can reach this port can "
            f"upload and read scans (set --token or {TOKEN_ENV})",
            file=sys.stderr,
        )
    predictor = app.state.processor.predictor
    print(
        startup_line(host, port, data, store, predictor.bundle.config if predictor else None),
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
