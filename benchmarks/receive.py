"""Benchmark: the DICOM receiver (`ichscan listen`) on loopback.

Input: a 240-slice 0.625 mm 512x512 synthetic head CT series, uncompressed (Explicit VR
Little Endian, 0.5 MB per instance, as most scanners push), written once in the work folder.
Model: a ResNet18 bundle at 256 px on the brain/subdural/bone windows with random weights
(only the time matters; nothing here says anything about accuracy), reading 5 mm slabs as a
thin-series model does (the bundle's slice_thickness_mm = 5: 240 slices -> 30 slabs).

Each run starts a fresh `ichscan listen` process on an empty store and pushes the series from
this process (the SCU, a separate process: pynetdicom, the files streamed as they are,
TCP_NODELAY), over one association and again split over 4 at once. Measured:

  received/s      instances per second from the first C-STORE request to the last success
  last -> result  from the last instance's success to its result JSON reading "done", as a
                  worklist reader polling the store sees it (every 10 ms); raw, and minus
                  the series timeout (the quiet period that defines "complete")
  analysis        the receiver's own time_to_result_s minus the timeout (its log clock)

Baselines in the same run, same SCU, same series:
  - a plain pynetdicom Storage SCP doing `event.dataset.save_as(path)` (the tutorial SCP:
    decode, re-encode, no fsync) and one writing the encoded bytes without fsync: what the
    durable write (temp, fsync file and folder, rename, parse-and-check) costs;
  - the analysis alone in this process: `ichscan.load` + the same model on the same stored
    folder, model already loaded (what `ichscan predict` does per scan).

Run:  .venv/bin/python benchmarks/receive.py [--repeat 3] [--timeout 2] [--associations 4]
      [--work bench_out/receive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_common import random_bundle, thin_series

N_SLICES, THIN_MM, THICK_MM, SIZE = 240, 0.625, 5.0, 256
_LISTENING = re.compile(r"listening as \S+ on 127\.0\.0\.1:(\d+)")


def make_series(work: Path) -> tuple[Path, list[Path]]:
    folder = thin_series(work / "series", N_SLICES, THIN_MM, "none")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == N_SLICES, len(files)
    return folder, files


def make_bundle(work: Path) -> Path:
    return random_bundle(work / "model", SIZE, slice_thickness_mm=THICK_MM)


# -- the SCU ------------------------------------------------------------------------------


def push(port: int, files: list[Path], called: str, associations: int = 1) -> dict[str, float]:
    """Send every file, split over ``associations`` associations at once (one thread each);
    wall-clock times of the first request and the last success."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the files as they are on disk
    assocs = []
    for _ in range(associations):
        ae = AE("BENCHSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise SystemExit(f"no association with {called} on port {port}")
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assocs.append(assoc)
    errors: list[str] = []

    def send(assoc, part: list[Path]) -> None:
        for path in part:
            status = assoc.send_c_store(str(path))
            if status.get("Status") != 0:
                errors.append(f"{path.name}: status {status.get('Status')}")
                return

    threads = [
        threading.Thread(target=send, args=(a, files[i::associations]))
        for i, a in enumerate(assocs)
    ]
    first = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = time.time()
    for assoc in assocs:
        assoc.release()
    if errors:
        raise SystemExit("; ".join(errors))
    return {"first": first, "last": last, "per_s": len(files) / (last - first)}


# -- the processes under test -------------------------------------------------------------


class Process:
    """A child process whose stderr is collected; ready when `pattern` shows up."""

    def __init__(self, cmd: list[str], pattern: re.Pattern[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if (m := pattern.search(line)) is not None:
                    self.port = int(m[1])
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or not self.port:
            self.proc.kill()
            raise SystemExit("process did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


PLAIN_SCP = r"""
import sys, pathlib, pynetdicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
def store(event):
    path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
    if mode == "save_as":
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(path, enforce_file_format=True)
    else:
        path.write_bytes(event.encoded_dataset())
    return 0
def nodelay(event):
    import socket
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ae = AE("PLAIN")
ae.add_supported_context(CTImageStorage)
server = ae.start_server(("127.0.0.1", 0), block=False,
    evt_handlers=[(evt.EVT_C_STORE, store), (evt.EVT_ACCEPTED, nodelay)])
print(f"plain SCP on 127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
import time; time.sleep(1e9)  # until SIGTERM
"""


def run_ichscan(
    model: Path, files: list[Path], work: Path, timeout_s: float, associations: int = 1
) -> dict[str, float]:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    listener = Process(
        [
            sys.executable,
            "-m",
            "ichscan.cli",
            "listen",
            "--model",
            str(model),
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
        _LISTENING,
    )
    try:
        sent = push(listener.port, files, "ICHSCAN", associations)
        [result] = list((store / "results").glob("*/*.json"))
        while True:
            record = json.loads(result.read_text())
            if record["status"] in ("done", "failed"):
                seen = time.time()
                break
            time.sleep(0.01)
    finally:
        listener.stop()
    if record["status"] != "done":
        raise SystemExit(f"analysis failed: {record['error']}")
    assert record["instances"] == N_SLICES, record["instances"]
    raw = seen - sent["last"]
    return {
        "received_per_s": sent["per_s"],
        "send_s": sent["last"] - sent["first"],
        "last_to_result_s": raw,
        "last_to_result_minus_timeout_s": raw - timeout_s,
        "analysis_s": record["time_to_result_s"] - timeout_s,
        "slices_analysed": record["slices"],
        "store": str(store),
    }


def run_plain(files: list[Path], work: Path, mode: str, associations: int = 1) -> dict[str, float]:
    out = work / f"plain_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    scp = Process(
        [sys.executable, "-c", PLAIN_SCP, str(out), mode],
        re.compile(r"plain SCP on 127\.0\.0\.1:(\d+)"),
    )
    try:
        sent = push(scp.port, files, "PLAIN", associations)
    finally:
        scp.stop()
    assert len(list(out.glob("*.dcm"))) == N_SLICES
    return {"received_per_s": sent["per_s"], "send_s": sent["last"] - sent["first"]}


def run_analysis_alone(model: Path, folder: Path, repeat: int) -> dict[str, float]:
    """Load + model on the stored series in this process (model loaded once, not timed)."""
    import ichscan
    from ichscan.infer.predictor import Predictor

    predictor = Predictor(model, "cpu")
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        start = time.perf_counter()
        scan = ichscan.load(folder, workers=1)
        _, x = predictor.prepare(scan)
        predictor.predict_inputs(x)
        times.append(time.perf_counter() - start)
    return {"analysis_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=2.0, help="--series-timeout (s)")
    parser.add_argument("--associations", type=int, default=4, help="for the parallel rows")
    parser.add_argument("--work", type=Path, default=Path("bench_out/receive"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    _, files = make_series(args.work)
    model = make_bundle(args.work)
    cores = len(os.sched_getaffinity(0))

    load_before = os.getloadavg()[0]
    n = args.associations
    runs: dict[str, list[dict[str, float]]] = {
        "ichscan listen": [],
        "plain SCP, dataset.save_as": [],
        "plain SCP, raw bytes": [],
        f"ichscan listen, {n} associations": [],
        f"plain SCP, raw bytes, {n} associations": [],
    }
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat}...", flush=True)
        runs["ichscan listen"].append(run_ichscan(model, files, args.work, args.timeout))
        runs["plain SCP, dataset.save_as"].append(run_plain(files, args.work, "save_as"))
        runs["plain SCP, raw bytes"].append(run_plain(files, args.work, "raw"))
        runs[f"ichscan listen, {n} associations"].append(
            run_ichscan(model, files, args.work, args.timeout, n)
        )
        runs[f"plain SCP, raw bytes, {n} associations"].append(
            run_plain(files, args.work, "raw", n)
        )
    stored = Path(runs["ichscan listen"][-1]["store"]) / "incoming"
    [stored_series] = list(stored.glob("*/*"))
    alone = run_analysis_alone(model, stored_series, args.repeat)

    load_after = os.getloadavg()[0]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print(
        f"\n`ichscan listen` on loopback: one synthetic {N_SLICES}-slice {THIN_MM} mm 512x512 "
        f"uncompressed phantom series; ResNet18 at {SIZE} px on {THICK_MM:g} mm slabs "
        "(random weights); "
        f"{platform.processor() or platform.machine()}, {cores} cores; series timeout "
        f"{args.timeout:g} s; median of {args.repeat}; load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
    )
    print(f"{'receiver':<42}{'received/s':>12}{'send 240':>10}")
    for name in runs:
        print(f"{name:<42}{med(name, 'received_per_s'):>12.1f}{med(name, 'send_s'):>9.2f}s")
    raw = med("ichscan listen", "last_to_result_s")
    print(
        f"\nlast instance -> result JSON 'done': {raw:.2f} s raw, "
        f"{med('ichscan listen', 'last_to_result_minus_timeout_s'):.2f} s after the "
        f"{args.timeout:g} s series timeout; the receiver's own clock: "
        f"{med('ichscan listen', 'analysis_s'):.2f} s of analysis "
        f"({runs['ichscan listen'][0]['slices_analysed']} slabs)"
    )
    print(
        f"with {n} associations: {med(f'ichscan listen, {n} associations', 'last_to_result_s'):.2f}"
        f" s raw, {med(f'ichscan listen, {n} associations', 'analysis_s'):.2f} s of analysis"
    )
    print(
        f"baseline, the analysis alone in-process (load + model, no SR, no JSON): "
        f"{alone['analysis_s']:.2f} s"
    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores",
        "series": f"{N_SLICES} x 512x512, {THIN_MM} mm, Explicit VR Little Endian",
        "series_timeout_s": args.timeout,
        "load_average": [load_before, load_after],
        "runs": runs,
        "analysis_alone": alone,
    }
    (args.work / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
