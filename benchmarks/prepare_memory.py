"""Benchmark: peak memory of `ichscan prepare` at 2,000 and 20,000 slices (target: under
1.5 GB at both sizes, and about the same).

Writing 20,000 distinct 512x512 DICOM files would cost ~10 GB and minutes for nothing the
measurement needs: the work per row (open, decode, window, resize, write into the shard) is
the same whether or not the file was seen before. So a few hundred distinct synthetic
512x512 slices (the head phantom, written once with `write_ct_series`, uncompressed) are
referenced over and over by a manifest of N rows, each row with its own image id.

Each size runs `prepare` (all cores, default shard size 1024, 256x256x3 output) in a fresh
child process; its whole process tree is sampled with psutil while it runs:
- peak tree RSS: the largest sum of RSS over the child and its pool workers at one instant
  (pages shared between the forked processes are counted once per process, so this
  overstates the real footprint),
- peak tree PSS: the same with shared pages split between the processes that share them
  (the honest figure for "how much RAM does this take"),
- peak prepare / worker: the kernel's own high-water marks over the whole run (they catch
  spikes between samples): the prepare process's VmHWM (/proc/self/status; getrusage's
  ru_maxrss is no use for it, because Linux carries that across exec from this driver,
  so it showed the driver's peak) and getrusage's peak RSS of its largest pool worker.

Run:  .venv/bin/python benchmarks/prepare_memory.py [--sizes 2000 20000] [--distinct 200]
          [--work DIR] [--keep]
Needs psutil (pip install psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

SLICES_PER_PHANTOM = 40
MB = 1024**2


def write_synthetic_slices(folder: Path, n: int) -> list[Path]:
    """n distinct uncompressed 512x512 phantom CT slices (reused when already there)."""
    from ichscan.data.phantom import make_head_phantom
    from ichscan.io.dicom_write import write_ct_series

    existing = sorted(folder.rglob("*.dcm")) if folder.exists() else []
    if len(existing) >= n:
        return existing[:n]
    shutil.rmtree(folder, ignore_errors=True)
    paths: list[Path] = []
    for seed in range(-(-n // SLICES_PER_PHANTOM)):
        hu, _ = make_head_phantom((SLICES_PER_PHANTOM, 512, 512), (3.75, 0.45, 0.45), seed=seed)
        paths += write_ct_series(
            hu,
            folder / f"series{seed:03d}",
            slice_spacing=3.75,
            pixel_spacing=(0.45, 0.45),
            patient_id=f"SYNTH{seed:04d}",
        )
    return paths[:n]


def repeated_manifest(paths: list[Path], n_rows: int) -> pd.DataFrame:
    """n_rows manifest rows cycling over `paths`; every row its own image id."""
    from ichscan.data.manifest import normalise
    from ichscan.labels import RSNA

    rows = np.arange(n_rows)
    df = pd.DataFrame(
        {
            "path": [str(paths[i % len(paths)]) for i in rows],
            "kind": "dicom",
            "image_id": [f"row{i:07d}" for i in rows],
            "patient_id": [f"P{i // 40:05d}" for i in rows],
            "slice_index": rows % 40,
            "any": rows % 2,
        }
    )
    return normalise(df, RSNA)


def sample_tree(proc, interval: float = 0.1) -> dict[str, float]:
    """Sample the process tree of `proc` until it exits; peak figures in MiB."""
    import psutil

    root = psutil.Process(proc.pid)
    peak = {"tree_rss": 0.0, "tree_pss": 0.0, "process_rss": 0.0, "processes": 0}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = pss = 0.0
        alive = 0
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            alive += 1
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            peak["process_rss"] = max(peak["process_rss"], info.rss / MB)
        peak["tree_rss"] = max(peak["tree_rss"], rss / MB)
        peak["tree_pss"] = max(peak["tree_pss"], pss / MB)
        peak["processes"] = max(peak["processes"], alive)
        time.sleep(interval)
    return peak


def own_peak_mib() -> float:
    """This process's peak RSS since it was exec'd (VmHWM belongs to the address space, which
    exec replaces; ru_maxrss belongs to the process and keeps the launcher's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def child(manifest: str, out: str) -> None:
    from ichscan.data.prepare import prepare

    result = prepare(manifest, out, progress=False, overwrite=True)
    # ru_maxrss is KiB on Linux; RUSAGE_CHILDREN = the largest pool worker.
    figures = {
        "n_ok": result.n_ok,
        "n_bad": result.n_bad,
        "seconds": result.seconds,
        "prepare_peak": own_peak_mib(),
        "worker_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(json.dumps(figures))


def measure(manifest: Path, out: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(manifest), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = sample_tree(proc)
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed (exit {proc.returncode})")
    return {**json.loads(stdout.strip().splitlines()[-1]), **peak, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--distinct", type=int, default=200, help="distinct DICOM slices")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from ichscan.data.manifest import write_manifest
    from ichscan.labels import RSNA

    work = args.work or Path(tempfile.mkdtemp(prefix="ichscan-prepare-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = write_synthetic_slices(work / "dicom", args.distinct)
    print(
        f"{len(paths)} distinct synthetic 512x512 uncompressed DICOM slices "
        f"({time.perf_counter() - start:.0f} s to make); each manifest references them "
        "repeatedly, one image id per row"
    )
    cores = len(os.sched_getaffinity(0))
    print(f"prepare: all {cores} cores, shard size 1024, 256x256x3 uint8\n")
    header = (
        f"{'slices':>7} {'ok':>7} {'seconds':>8} {'slices/s':>9} {'peak tree RSS':>14} "
        f"{'peak tree PSS':>14} {'procs':>6} {'peak prepare':>14} {'maxrss worker':>14}"
    )
    print(header)
    results = {}
    for n in args.sizes:
        manifest = write_manifest(repeated_manifest(paths, n), work / f"m{n}.parquet", RSNA)
        out = work / f"cache{n}"
        r = measure(manifest, out)
        results[n] = r
        print(
            f"{n:>7} {r['n_ok']:>7} {r['seconds']:>8.1f} {n / r['seconds']:>9.0f} "
            f"{r['tree_rss']:>10.0f} MiB {r['tree_pss']:>10.0f} MiB {r['processes']:>6} "
            f"{r['prepare_peak']:>10.0f} MiB {r['worker_maxrss']:>10.0f} MiB"
        )
        if not args.keep:
            shutil.rmtree(out)
    (work / "prepare_memory.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {work / 'prepare_memory.json'}")
    if args.work is None and not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
