"""Benchmark: the web app under concurrent uploads, from another process, on loopback.

The server is ``ichscan serve`` in a subprocess (its own Python, its own model, one worker
thread unless --workers); this script is the client. Each upload is a synthetic 16-slice
256x256 DICOM series (uncompressed, about 2.1 MB, written once into the work folder), sent
as 16 multipart ``files`` parts; the client then waits on ``GET /api/scans/{id}?wait=30``
(answered as soon as the scan is done) and fetches its most suspicious slice as a PNG.

Phases, in one run against the same server:
  baseline    1 client, uploads one after another (--baseline-uploads, default 8)
  concurrent  --clients clients (default 8) sharing --uploads uploads (default 64),
              stopped after --max-seconds (default 120) however many are done
During the concurrent phase a probe asks ``GET /api/health`` every 100 ms: it must keep
answering while scans are read and predicted.

Reported per phase: upload latency (POST until 201, the body sent and checked), time to
result (POST until the poll sees "done"), slice PNG latency, errors (any non-2xx answer,
a failed scan, a timeout or a dropped connection), throughput in scans/s (finished scans
over the phase's wall time) and the concurrent/baseline throughput ratio. The server runs
with ``--inline-wait 0`` unless told otherwise, so the upload latency is the upload itself.

Model: --model MODEL_DIR, or by default a ResNet18 bundle at 128 px with random weights
(built once in the work folder; the probabilities mean nothing, the time is what counts).

Run:  .venv/bin/python benchmarks/serve_load.py [--model DIR] [--clients 8] [--uploads 64]
      [--max-seconds 120] [--workers 1] [--work bench_out/serve_load]
Target: 0 errors at 8 concurrent clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench_common import random_bundle

SLICES, MATRIX, SIZE = 16, 256, 128
TOKEN = "bench-token"
WAIT_S, HEALTH_S = 30.0, 0.1
RESULT_TIMEOUT_S = 300.0


def make_series(work: Path) -> list[tuple[str, bytes]]:
    """The series' files as (name, bytes), written once into the work folder."""
    from ichscan.data.synth import write_synthetic

    root = work / "series"
    if not (root / "README.txt").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_synthetic(
            root,
            n_scans=1,
            seed=11,
            layout="dicom",
            shape=(SLICES, MATRIX, MATRIX),
            findings=["subdural"],
        )
    files = sorted(root.glob("*/*/*.dcm"))
    return [(p.name, p.read_bytes()) for p in files]


def make_bundle(work: Path) -> Path:
    """A ResNet18 slice model at SIZE px with random weights, as a bundle."""
    return random_bundle(work / "model", SIZE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace, model: Path, data: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "ichscan.cli",
        "serve",
        "--model",
        str(model),
        "--data",
        str(data),
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--workers",
        str(args.workers),
        "--inline-wait",
        str(args.inline_wait),
        "--device",
        "cpu",
    ]
    log = open(data.parent / "server.log", "w")  # noqa: SIM115 (kept open for the child)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see server.log")
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("the server did not answer /api/health in time")


@dataclass
class Phase:
    name: str
    clients: int
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    upload_s: list[float] = field(default_factory=list)
    result_s: list[float] = field(default_factory=list)
    slice_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, upload: float, result: float, png: float) -> None:
        with self.lock:
            self.upload_s.append(upload)
            self.result_s.append(result)
            self.slice_s.append(png)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    @property
    def throughput(self) -> float:
        return len(self.result_s) / self.wall_s if self.wall_s else 0.0

    def _per_scan(self, cpu: float) -> float | None:
        return round(cpu / len(self.result_s), 3) if self.result_s else None

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "scans_done": len(self.result_s),
            "errors": len(self.errors),
            "error_samples": self.errors[:5],
            "wall_s": round(self.wall_s, 2),
            "throughput_scans_per_s": round(self.throughput, 3),
            # CPU seconds (user + system) per finished scan: the server process and this
            # client process. Similar server figures in both phases mean the server does not
            # work harder per scan under concurrency; the machine's cores are shared.
            "server_cpu_s_per_scan": self._per_scan(self.server_cpu_s),
            "client_cpu_s_per_scan": self._per_scan(self.client_cpu_s),
            "upload_s": percentiles(self.upload_s),
            "time_to_result_s": percentiles(self.result_s),
            "slice_png_s": percentiles(self.slice_s),
        }


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "p50": round(float(p50), 3),
        "p90": round(float(p90), 3),
        "p99": round(float(p99), 3),
        "max": round(float(arr.max()), 3),
    }


def one_upload(client: Any, url: str, files: list[tuple[str, bytes]], phase: Phase) -> None:
    import httpx

    parts = [("files", (name, data, "application/dicom")) for name, data in files]
    t0 = time.perf_counter()
    try:
        response = client.post(url + "/api/scans", files=parts)
        t_upload = time.perf_counter() - t0
        if response.status_code != 201:
            phase.error(f"upload {response.status_code}: {response.text[:200]}")
            return
        record = response.json()
        while record["status"] in ("queued", "processing"):
            if time.perf_counter() - t0 > RESULT_TIMEOUT_S:
                phase.error(f"scan {record['id']} not done after {RESULT_TIMEOUT_S:.0f} s")
                return
            # The server answers as soon as the scan is done (it looks every 50 ms).
            answer = client.get(f"{url}/api/scans/{record['id']}", params={"wait": WAIT_S})
            if answer.status_code != 200:
                phase.error(f"poll {answer.status_code}: {answer.text[:200]}")
                return
            record = answer.json()
        t_result = time.perf_counter() - t0
        if record["status"] != "done":
            phase.error(f"scan {record['id']} {record['status']}: {record.get('error')}")
            return
        t1 = time.perf_counter()
        png = client.get(f"{url}/api/scans/{record['id']}/slices/{record['key_slice']}.png")
        t_png = time.perf_counter() - t1
        if png.status_code != 200 or png.headers.get("content-type") != "image/png":
            phase.error(f"slice {png.status_code}")
            return
        phase.add(t_upload, t_result, t_png)
    except httpx.HTTPError as exc:
        phase.error(f"{type(exc).__name__}: {exc}")


def cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def run_phase(
    name: str,
    url: str,
    files: list[tuple[str, bytes]],
    clients: int,
    uploads: int,
    max_seconds: float,
    server_pid: int,
) -> Phase:
    import httpx
    import psutil

    phase = Phase(name, clients)
    server, me = psutil.Process(server_pid), psutil.Process()
    server_cpu, client_cpu = cpu_seconds(server), cpu_seconds(me)
    tickets = iter(range(uploads))
    ticket_lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(headers=headers, timeout=RESULT_TIMEOUT_S) as client:
            while time.monotonic() < deadline:
                with ticket_lock:
                    if next(tickets, None) is None:
                        return
                one_upload(client, url, files, phase)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall_s = time.perf_counter() - start
    phase.server_cpu_s = cpu_seconds(server) - server_cpu
    phase.client_cpu_s = cpu_seconds(me) - client_cpu
    return phase


class HealthProbe:
    """GET /api/health every 100 ms on its own connection while the load runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.url + "/api/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies.append(time.perf_counter() - t0)
                else:
                    self.failures += 1
                self.stop.wait(HEALTH_S)

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def print_phase(phase: Phase) -> None:
    s = phase.summary()

    def row(key: str) -> str:
        p = s[key]
        return f"p50 {p['p50']} / p90 {p['p90']} / p99 {p['p99']} / max {p['max']} s"

    print(f"\n{phase.name}: {phase.clients} client(s), {s['scans_done']} scans in {s['wall_s']} s")
    print(f"  upload          {row('upload_s')}")
    print(f"  time to result  {row('time_to_result_s')}")
    print(f"  slice PNG       {row('slice_png_s')}")
    print(f"  throughput      {s['throughput_scans_per_s']} scans/s; errors {s['errors']}")
    print(
        f"  CPU per scan    server {s['server_cpu_s_per_scan']} s, "
        f"client {s['client_cpu_s_per_scan']} s"
    )
    for sample in s["error_samples"]:
        print(f"    error: {sample}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model bundle (default: random-weight ResNet18 128 px)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--uploads", type=int, default=64)
    parser.add_argument("--baseline-uploads", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=1, help="server worker threads")
    parser.add_argument("--inline-wait", type=float, default=0.0, help="server --inline-wait")
    parser.add_argument("--work", default="bench_out/serve_load")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = make_series(work)
    model = Path(args.model) if args.model else make_bundle(work)
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, model, data, port)
    try:
        t0 = time.perf_counter()
        wait_healthy(url, server)
        startup = time.perf_counter() - t0
        weights = "" if args.model else ", random weights: only the time counts"
        print(
            f"server up in {startup:.1f} s (model {model}{weights}; {args.workers} worker(s)); "
            f"upload = one synthetic {len(files)}-slice phantom series, {len(files)} DICOM "
            f"files, {sum(len(d) for _, d in files) / 1e6:.1f} MB"
        )
        # One scan first so that both phases meet a warm model (first-call costs excluded).
        pid = server.pid
        run_phase("warm-up", url, files, 1, 1, args.max_seconds, pid)
        baseline = run_phase(
            "baseline", url, files, 1, args.baseline_uploads, args.max_seconds, pid
        )
        print_phase(baseline)
        with HealthProbe(url) as probe:
            load = run_phase(
                "concurrent", url, files, args.clients, args.uploads, args.max_seconds, pid
            )
        print_phase(load)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    health = percentiles(probe.latencies)
    ratio = load.throughput / baseline.throughput if baseline.throughput else None
    print(
        f"\nhealth during load: {len(probe.latencies)} answers, {probe.failures} failures, "
        f"p50 {health['p50']} / p99 {health['p99']} / max {health['max']} s"
    )
    print(f"throughput concurrent/baseline: {ratio:.2f}x" if ratio else "throughput ratio: n/a")
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            # Other work on a shared machine shows here; the figures move with it.
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        },
        "model": str(model),
        "upload": {"files": len(files), "bytes": sum(len(d) for _, d in files)},
        "server": {"workers": args.workers, "inline_wait_s": args.inline_wait},
        "startup_s": round(startup, 2),
        "baseline": baseline.summary(),
        "concurrent": load.summary(),
        "health_during_load": {
            **health,
            "answers": len(probe.latencies),
            "failures": probe.failures,
        },
        "throughput_ratio": round(ratio, 3) if ratio else None,
    }
    (work / "results.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(data, ignore_errors=True)
    errors = len(load.errors) + len(baseline.errors) + probe.failures
    print(f"load average at the end (1/5/15 min): {report['machine']['load_average_1_5_15']}")
    print(f"wrote {work / 'results.json'}; errors in all: {errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
