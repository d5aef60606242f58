"""Benchmark: `ichscan prepare` (all cores, into the shard cache) against the naive
one-file-at-a-time conversion a first notebook would write (pydicom dcmread, float64 HU and
windows, a PIL resize per channel, one PNG written per slice), timed in the same run on the
same uncompressed 512x512 slices. Target: prepare >= 10x the naive slices/s.

Inputs (each row of a manifest is one slice; files are referenced repeatedly, every row with
its own image id, which costs prepare the same work as distinct files would):
- the 5 real RSNA 2019 slices (../shared/data/rsna_dicom), repeated,
- 200 distinct synthetic phantom slices, repeated.

The machine may be shared: the two methods alternate for --rounds rounds and the best round
of each counts. CPU seconds per slice (all processes) are printed too, a figure that other
load on the machine disturbs less than wall time.

Run:  .venv/bin/python benchmarks/prepare_speed.py [--rows 2000] [--naive-rows 200]
          [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from PIL import Image

# Run as a script, this folder is on sys.path: the slice and manifest makers are shared.
from prepare_memory import repeated_manifest, write_synthetic_slices
from preprocess import REAL_RSNA, naive_slice


def naive_convert(path: str, out: Path) -> None:
    """The naive baseline of preprocess.py, plus the PNG write a conversion script does."""
    Image.fromarray(naive_slice(path)).save(out)


def cpu_seconds() -> float:
    """User + system CPU of this process and every child it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(run: Callable[[], int]) -> tuple[float, float]:
    """(wall seconds per slice, CPU seconds per slice)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    n = run()
    return (time.perf_counter() - start) / n, (cpu_seconds() - cpu) / n


def run_naive(paths: list[str], out: Path) -> Callable[[], int]:
    def run() -> int:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for i, p in enumerate(paths):
            naive_convert(p, out / f"{i:07d}.png")
        return len(paths)

    return run


def run_prepare(df: pd.DataFrame, out: Path, workers: int) -> Callable[[], int]:
    from ichscan.data.prepare import prepare

    def run() -> int:
        result = prepare(df, out, workers=workers, progress=False, overwrite=True)
        assert result.n_bad == 0, result
        return result.n_ok

    return run


def bench_set(
    name: str, paths: list[Path], args: argparse.Namespace, work: Path, cores: int
) -> dict[str, tuple[float, float]]:
    df = repeated_manifest(paths, args.rows)
    naive_paths = [str(paths[i % len(paths)]) for i in range(args.naive_rows)]
    methods = {
        "naive (float64, PIL, PNG)": run_naive(naive_paths, work / "naive_png"),
        "ichscan prepare, 1 process": run_prepare(df, work / "cache", 1),
        f"ichscan prepare, {cores} processes": run_prepare(df, work / "cache", cores),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for method, run in methods.items():
            wall, cpu = timed(run)
            old = best.get(method)
            best[method] = (min(wall, old[0]), min(cpu, old[1])) if old else (wall, cpu)
    naive_wall, naive_cpu = best["naive (float64, PIL, PNG)"]
    for method, (wall, cpu) in best.items():
        print(
            f"{name:<40} {method:<28} {1 / wall:>9.0f} {naive_wall / wall:>8.1f} "
            f"{1000 * cpu:>11.2f} {naive_cpu / cpu:>10.1f}"
        )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="manifest rows per input set")
    parser.add_argument("--naive-rows", type=int, default=200, help="slices the naive path runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ichscan-prepare-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))

    sets: dict[str, list[Path]] = {}
    real = sorted((REAL_RSNA / "stage_2_train").glob("ID_*.dcm"))
    if real:
        sets[f"real RSNA ({len(real)} slices, repeated)"] = real
    else:
        print(f"(real RSNA slices not found under {REAL_RSNA}: synthetic only)")
    synthetic = write_synthetic_slices(work / "dicom", 200)
    sets["synthetic (200 slices, repeated)"] = synthetic

    print(
        f"DICOM slice -> brain/subdural/bone 256x256 uint8, {cores} cores; prepare over "
        f"{args.rows} rows, naive over {args.naive_rows}; best of {args.rounds} alternating rounds"
    )
    print(
        f"{'input':<40} {'method':<28} {'slices/s':>9} {'x naive':>8} "
        f"{'CPU ms/slice':>11} {'x naive CPU':>10}"
    )
    for name, paths in sets.items():
        bench_set(name, paths, args, work, cores)
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
