"""Benchmark: DICOM slice → 3-window (brain, subdural, bone) 256x256 uint8 model input.

Measures, in one run and on the same files:
- the naive baseline a first notebook would write (dcmread, float64 HU and windows, PIL resize
  of each channel, one file at a time),
- ichscan's path (fused stored→window lookup table, one gather, PIL box reduce) on one
  process and on every core,
for uncompressed slices (the five real RSNA 2019 slices, repeated) and JPEG Lossless SV1
slices (synthetic phantom, 512x512), and the time to load a 240-slice thin JPEG-lossless
series with `ichscan.load`.

Run:  .venv/bin/python benchmarks/preprocess.py [--repeat N] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

REAL_RSNA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna_dicom"
NAIVE_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


def naive_slice(path: str) -> np.ndarray:
    """What a first notebook does: float64 everywhere, a PIL resize per channel."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    channels = []
    for center, width in NAIVE_WINDOWS:
        x = np.clip((hu - (center - width / 2)) / width, 0.0, 1.0) * 255.0
        img = Image.fromarray(x.astype(np.uint8)).resize((256, 256), Image.BILINEAR)
        channels.append(np.asarray(img))
    return np.stack(channels, axis=-1)


def time_per_slice(run: Callable[[], int], repeats: int = 3) -> float:
    """Best-of-N seconds per slice (the minimum is the least noisy estimate)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        times.append((time.perf_counter() - start) / n)
    return min(times)


def run_naive(paths: Sequence[str]) -> Callable[[], int]:
    def run() -> int:
        for p in paths:
            naive_slice(p)
        return len(paths)

    return run


def run_ichscan(paths: Sequence[str], workers: int) -> Callable[[], int]:
    from ichscan.preprocess.slice_input import dicom_files_to_inputs

    def run() -> int:
        out = np.empty((len(paths), 256, 256, 3), np.uint8)
        for i, (_, arr) in enumerate(dicom_files_to_inputs(paths, workers=workers)):
            out[i] = arr
        return len(paths)

    return run


def make_jpeg_lossless_series(folder: Path, n_slices: int) -> list[str]:
    from ichscan.data.phantom import make_head_phantom
    from ichscan.io.dicom_write import write_ct_series

    existing = sorted(str(p) for p in folder.glob("*.dcm")) if folder.exists() else []
    if len(existing) == n_slices:
        return existing
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    hu, _ = make_head_phantom((n_slices, 512, 512), (150.0 / n_slices, 0.45, 0.45), seed=3)
    paths = write_ct_series(
        hu,
        folder,
        slice_spacing=150.0 / n_slices,
        pixel_spacing=(0.45, 0.45),
        compression="jpeg-lossless",
        series_description="Head thin JPEG lossless",
    )
    return sorted(str(p) for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat",
        type=int,
        default=40,
        help="copies of the 5 real RSNA slices in the uncompressed set",
    )
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores",
        "python": platform.python_version(),
    }

    real = sorted(str(p) for p in (REAL_RSNA / "stage_2_train").glob("ID_*.dcm"))
    if not real:
        raise SystemExit(f"real RSNA slices not found under {REAL_RSNA}")
    uncompressed = real * args.repeat
    thin = make_jpeg_lossless_series(out / "thin_jpeg_lossless", 240)
    sets = {
        f"uncompressed (5 real RSNA slices x {args.repeat})": uncompressed,
        "JPEG Lossless SV1 (240 synthetic 512x512 slices)": thin,
    }
    print("DICOM slice -> brain/subdural/bone 256x256 uint8; best of 3 runs")
    print(f"{'input':<52} {'method':<24} {'slices/s':>9} {'x naive':>8}")
    for name, paths in sets.items():
        naive = time_per_slice(run_naive(paths[:100]))
        rows = {"naive (float64, PIL)": naive}
        rows["ichscan, 1 process"] = time_per_slice(run_ichscan(paths, 1))
        rows[f"ichscan, {cores} processes"] = time_per_slice(run_ichscan(paths, cores))
        results[name] = {}
        for method, per_slice in rows.items():
            ratio = naive / per_slice
            results[name][method] = {"slices_per_s": 1 / per_slice, "x_naive": ratio}  # type: ignore[index]
            print(f"{name:<52} {method:<24} {1 / per_slice:>9.0f} {ratio:>8.1f}")

    import ichscan

    load_times = []
    for _ in range(3):
        start = time.perf_counter()
        scan = ichscan.load(Path(thin[0]).parent)
        load_times.append(time.perf_counter() - start)
    results["load_240_slice_jpeg_lossless_s"] = {
        "best": min(load_times),
        "median": statistics.median(load_times),
        "shape": scan.shape,
    }
    print(
        f"\nichscan.load of a 240-slice 512x512 JPEG-lossless series: best {min(load_times):.2f} s"
        f", median {statistics.median(load_times):.2f} s (target < 3 s)"
    )
    (out / "preprocess.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'preprocess.json'}")


if __name__ == "__main__":
    main()
