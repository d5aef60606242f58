"""Benchmark: end-to-end `predict` of one thin head CT series on this CPU.

Input: a 240-slice 0.625 mm 512x512 JPEG-lossless DICOM series of the synthetic phantom
(written once, cached in the work folder). Model: a ResNet18 (or --arch) bundle at 256 px on the
brain/subdural/bone windows (random weights: only the time matters), built once.

Stages timed after the model is loaded, per scan:
  load     discover the series, decode 240 JPEG-lossless slices to HU (ichscan.load)
  reslice  0.625 mm -> 5 mm slabs along the slice normal (30 slabs)
  window   3 windows + resize to 256 (scan_to_model_input)
  infer    the network on every slab (+ its mirror with TTA)
  write    CSV rows (slices and scan)

Configurations: PyTorch with TTA (ichscan's default), PyTorch without, onnxruntime with TTA,
and PyTorch with TTA taking each batch in one network pass (as before session 8, when the
CPU began to run EfficientNet and DenseNet in passes of 4 images: infer shows what that
saves; ResNet18 kept the whole batch).
The baseline, measured in the same run, is the straightforward script: pydicom per file,
float64 HU and windows, a mean over each 8 slices, PIL resize per channel, the same model
one slab at a time (with the mirror), the csv module.

Run:  .venv/bin/python benchmarks/predict_scan.py [--repeat 3] [--work bench_out/predict_scan]
      [--threads N] [--arch efficientnet_lite0]
Target: <= 5 s per scan after model load (checked with flip TTA, the slower setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import random_bundle, thin_series

N_SLICES, THIN_MM, THICK_MM, SIZE = 240, 0.625, 5.0, 256
WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


def make_series(work: Path) -> Path:
    return thin_series(work / "series", N_SLICES, THIN_MM, "jpeg-lossless")


def make_bundle(work: Path, architecture: str) -> Path:
    folder = "model" if architecture == "resnet18" else f"model-{architecture}"
    return random_bundle(work / folder, SIZE, architecture=architecture)


# -- the baseline -------------------------------------------------------------------------


def baseline(series: Path, model: torch.nn.Module, out: Path) -> dict[str, float]:
    import pydicom
    from PIL import Image

    times: dict[str, float] = {}
    start = time.perf_counter()
    slices = []
    for path in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    slices.sort(key=lambda s: s[0])
    volume = np.stack([s[1] for s in slices])
    times["load"] = time.perf_counter() - start

    t = time.perf_counter()
    per_slab = round(THICK_MM / THIN_MM)
    slabs = [volume[k : k + per_slab].mean(0) for k in range(0, len(volume), per_slab)]
    times["reslice"] = time.perf_counter() - t

    t = time.perf_counter()
    inputs = []
    for slab in slabs:
        channels = []
        for center, width in WINDOWS:
            x = np.clip((slab - (center - width / 2)) / width, 0.0, 1.0) * 255.0
            img = Image.fromarray(x.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
            channels.append(np.asarray(img))
        inputs.append(np.stack(channels))
    times["window"] = time.perf_counter() - t

    t = time.perf_counter()
    probs = []
    with torch.no_grad():
        for x in inputs:
            batch = torch.from_numpy(x)[None]
            p = (torch.sigmoid(model(batch)) + torch.sigmoid(model(batch.flip(3)))) / 2
            probs.append(p[0].numpy())
    times["infer"] = time.perf_counter() - t

    t = time.perf_counter()
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        for k, p in enumerate(probs):
            writer.writerow([series.name, k, *(f"{v:.6f}" for v in p)])
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return times


# -- ichscan ------------------------------------------------------------------------------


def ichscan_run(series: Path, predictor, out: Path) -> dict[str, float]:
    import ichscan
    from ichscan.infer.inputs import scan_to_model_input
    from ichscan.infer.predictor import ScanPrediction, scan_name
    from ichscan.infer.writers import open_writer

    times: dict[str, float] = {}
    start = time.perf_counter()
    scan = ichscan.load(series)
    times["load"] = time.perf_counter() - start
    t = time.perf_counter()
    thick = predictor.reslice(scan)
    times["reslice"] = time.perf_counter() - t
    t = time.perf_counter()
    x = scan_to_model_input(thick, predictor.spec)
    times["window"] = time.perf_counter() - t
    t = time.perf_counter()
    slice_probs, scan_probs, _ = predictor.predict_inputs(x)
    times["infer"] = time.perf_counter() - t
    t = time.perf_counter()
    pred = ScanPrediction(
        scan=scan_name(scan),
        source=scan.source,
        kind="dicom",
        labels=list(predictor.labels),
        thresholds=predictor.thresholds,
        slice_ids=list(thick.slice_ids),
        slice_probs=slice_probs,
        scan_probs=scan_probs,
    )
    writer = open_writer("csv", out, predictor)
    writer.add(pred)
    writer.close()
    times["write"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    assert thick.n_slices == N_SLICES * THIN_MM / THICK_MM, thick.n_slices
    return times


def best_of(run, repeat: int) -> dict[str, dict[str, float]]:
    runs = [run() for _ in range(repeat)]
    best = min(runs, key=lambda r: r["total"])
    return {"best": best, "median_total": statistics.median(r["total"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench_out/predict_scan"))
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads")
    parser.add_argument("--arch", default="resnet18", help="the bundle's backbone")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cores = len(os.sched_getaffinity(0))
    series = make_series(args.work)
    model_dir = make_bundle(args.work, args.arch)

    from ichscan.infer.onnx_export import export_onnx
    from ichscan.infer.predictor import Predictor

    if not (model_dir / "model.onnx").exists():
        export_onnx(model_dir)
    load_start = time.perf_counter()
    predictors = {
        "ichscan, PyTorch, TTA": Predictor(model_dir, "cpu", reslice_mm=THICK_MM),
        "ichscan, PyTorch, no TTA": Predictor(model_dir, "cpu", tta=False, reslice_mm=THICK_MM),
        "ichscan, onnxruntime, TTA": Predictor(model_dir, backend="onnx", reslice_mm=THICK_MM),
        # each batch in one network pass (before session 8): what infer.predictor.cpu_pass
        # saves for the families it splits (the same as the first row for the others)
        "ichscan, PyTorch, TTA, whole-batch passes": Predictor(
            model_dir, "cpu", reslice_mm=THICK_MM
        ),
    }
    predictors["ichscan, PyTorch, TTA, whole-batch passes"].backend.cpu_pass = 10**6
    load_s = (time.perf_counter() - load_start) / len(predictors)
    model = predictors["ichscan, PyTorch, TTA"].bundle.members[0]

    # Warm-up: first-call costs (kernel selection, page cache) are not per scan.
    ichscan_run(series, predictors["ichscan, PyTorch, TTA"], args.work / "warm.csv")
    base = baseline(series, model, args.work / "baseline.csv")
    rows = {
        "baseline (pydicom, float64, slab by slab)": {"best": base, "median_total": base["total"]}
    }
    for name, predictor in predictors.items():
        rows[name] = best_of(
            lambda p=predictor: ichscan_run(series, p, args.work / "preds.csv"), args.repeat
        )

    stages = ("load", "reslice", "window", "infer", "write", "total")
    print(
        f"\npredict one synthetic {N_SLICES}-slice {THIN_MM} mm 512x512 JPEG-lossless phantom "
        f"series -> {THICK_MM:g} mm, {args.arch} at {SIZE} px (random weights: only the time "
        f"counts); {platform.processor() or platform.machine()}, "
        f"{cores} cores, torch threads {torch.get_num_threads()}; best of {args.repeat} "
        f"(model load {load_s:.2f} s, not included)"
    )
    print(
        f"{'configuration':<44}"
        + "".join(f"{s:>9}" for s in stages)
        + f"{'median':>9}{'x base':>8}"
    )
    for name, r in rows.items():
        b = r["best"]
        ratio = base["total"] / b["total"]
        print(
            f"{name:<44}"
            + "".join(f"{b[s]:>8.2f}s" for s in stages)
            + f"{r['median_total']:>8.2f}s{ratio:>8.1f}"
        )
    default = rows["ichscan, PyTorch, TTA"]["best"]["total"]
    print(
        f"\ntarget <= 5 s per scan (with flip TTA, the slower setting): {default:.2f} s "
        f"{'MET' if default <= 5 else 'NOT MET'}"
    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} cores",
        "torch_threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "rows": rows,
    }
    (args.work / "predict_scan.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.work / 'predict_scan.json'}")


if __name__ == "__main__":
    main()
