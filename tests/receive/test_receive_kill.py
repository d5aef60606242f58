"""`ichscan listen` as a real process: SIGKILL in the middle of a transfer loses nothing that
was acknowledged, and after a restart the series is analysed exactly once; SIGTERM stops it
cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from ichscan.receive.store import open_store, read_analysed, result_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infer"))
from receive_helpers import associate, send, uids, wait_for_result, write_series

pytest_plugins = ["infer_fixtures"]
pytestmark = pytest.mark.timeout(240)

_LISTENING = re.compile(r"listening as \S+ on 127\.0\.0\.1:(\d+)")


class Listener:
    """`python -m ichscan.cli listen` with its log collected line by line."""

    def __init__(self, bundle: Path, store: Path, timeout_s: float = 1.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ichscan.cli",
                "listen",
                "--model",
                str(bundle),
                "--store",
                str(store),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--series-timeout",
                str(timeout_s),
                "--device",
                "cpu",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(90):
            self.proc.kill()
            raise AssertionError("listener did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if (m := _LISTENING.search(line)) is not None:
                self.port = int(m[1])
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)


def test_sigkill_mid_transfer_loses_nothing_and_analyses_once(
    trained_bundle: Path, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    paths = write_series(tmp_path / "in", n_slices=30)
    study, series, _ = uids(paths[0])

    first = Listener(trained_bundle, store_dir)
    acked: list[Path] = []
    kill_now = threading.Event()

    def killer() -> None:
        kill_now.wait(60)
        first.proc.send_signal(signal.SIGKILL)

    threading.Thread(target=killer, daemon=True).start()
    assoc = associate(first.port)
    assert assoc.is_established
    for p in paths:
        status = assoc.send_c_store(pydicom.dcmread(p))
        if status.get("Status") != 0:
            break  # the association died with the process
        acked.append(p)
        if len(acked) == 12:
            kill_now.set()  # the kill lands while the next instances are in flight
    first.proc.wait(30)
    assert first.proc.returncode == -signal.SIGKILL
    assert 12 <= len(acked) < len(paths), "the kill came mid-transfer"

    # Every acknowledged instance is on disk, complete, under its final name.
    store = open_store(store_dir)
    folder = store.series_dir(study, series)
    for p in acked:
        stored = folder / f"{uids(p)[2]}.dcm"
        assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(p).PixelData
    assert result_for(store, study, series)["status"] == "receiving"

    # Restart; the sender resends what it got no success for, as a PACS does.
    second = Listener(trained_bundle, store_dir)
    try:
        assert "1 unfinished series picked up" in second.log
        rest = [p for p in paths if p not in acked]
        assert send(second.port, rest) == [0] * len(rest)
        record = wait_for_result(store, study, series, timeout_s=90)
        assert record["instances"] == len(paths) == record["slices"]
        assert {p.stem for p in folder.glob("*.dcm")} == {uids(p)[2] for p in paths}
        time.sleep(1.5)  # a second (wrong) analysis would be queued within the timeout
        rows = [r for r in read_analysed(store) if r["series_instance_uid"] == series]
        assert len(rows) == 1 and rows[0]["status"] == "done"
    finally:
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0, second.log
    assert "SIGTERM received: stopping" in second.log and "stopped" in second.log
