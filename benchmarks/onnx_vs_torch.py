"""Benchmark: slice-model throughput on the CPU, PyTorch eager vs the ONNX export run by
onnxruntime, in the same run, on the same uint8 slices and thread count.

The model is a bundle's slice model as `ichscan export` writes it (uint8 in, normalisation
inside, probabilities and embedding out), random weights (only the time matters). Measured:

  torch eager (NCHW)          the plain `model(x)` a user would write, torch.inference_mode
  ichscan torch backend       what Predictor(backend="torch") runs (channels-last)
  onnxruntime                 what Predictor(backend="onnx") runs (all graph optimisations)

for batch sizes 1, 8 and 32, best of N timed passes over the same slices; the ratio is
onnxruntime slices/s over torch eager slices/s. Target: >= 1.5x at batch 32. The machine
may be shared: the three paths alternate, one pass each per round, so a change of load
falls on all three rather than on one path's block of passes. Fewer slices than the
largest batch are refused (that row would time a smaller batch under its label).

--bundle MODEL_DIR times a trained bundle instead (a small-set bundle too: its density
features are computed in NumPy by both paths, inside the timing), exported to the work
folder, and --cache CACHE feeds it real prepared slices (the first --slices rows, made into
the bundle's channels as the predictor makes them: the grey repeated, or brain, head, brain
for a bundle with the head reader) instead of random ones; the largest difference
between the two backends' probabilities is printed with the times.

Run:  .venv/bin/python benchmarks/onnx_vs_torch.py [--arch resnet18] [--size 256]
      [--slices 64] [--repeat 3] [--threads N] [--work bench_out/onnx_vs_torch]
      [--bundle MODEL_DIR [--cache CACHE]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def make_bundle(work: Path, arch: str, size: int) -> Path:
    from ichscan.labels import RSNA
    from ichscan.models.bundle import input_spec, new_config, save_bundle
    from ichscan.models.slice_model import SliceModel

    root = work / f"{arch}-{size}"
    if (root / "bundle.json").exists():
        return root
    torch.manual_seed(0)
    model = SliceModel(arch, len(RSNA.labels), pretrained="none", dropout=0.0).eval()
    spec = input_spec(
        ("brain", "subdural", "bone"),
        size,
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
    )
    config = new_config(
        architecture=arch,
        weights_provenance=model.provenance,
        label_set=RSNA,
        input_spec=spec,
        dropout=0.0,
    )
    return save_bundle(root, config, [model])


BATCHES = (1, 8, 32)


def slices_per_second(
    runs: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, batch: int, repeat: int
) -> dict[str, float]:
    """Each path's best of `repeat` passes over x in batches of `batch`, the paths taking
    turns within every round."""
    passes = {name: _one_pass(run, x, batch) for name, run in runs.items()}
    for one_pass in passes.values():
        one_pass()  # warm-up: kernel selection and allocation are not throughput
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeat):
        for name, one_pass in passes.items():
            best[name] = min(best[name], _timed(one_pass))
    return {name: len(x) / seconds for name, seconds in best.items()}


def _one_pass(run: Callable[[np.ndarray], object], x: np.ndarray, batch: int) -> Callable[[], None]:
    def one_pass() -> None:
        for start in range(0, len(x), batch):
            run(x[start : start + batch])

    return one_pass


def too_few_slices(n: int, where: str) -> str | None:
    """Why n slices cannot time every batch size, or None."""
    if n >= max(BATCHES):
        return None
    return (
        f"{where}: {n} slices, fewer than the largest batch ({max(BATCHES)}); that row would "
        f"time a batch of {n}: give --slices {max(BATCHES)} or more"
    )


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    parser.add_argument("--work", type=Path, default=Path("bench_out/onnx_vs_torch"))
    parser.add_argument("--bundle", type=Path, help="time this trained bundle instead")
    parser.add_argument("--cache", type=Path, help="real slices from this prepared cache")
    args = parser.parse_args()
    problem = too_few_slices(args.slices, "--slices")
    if problem:
        parser.error(problem)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from ichscan.infer.onnx_export import OnnxPredictor, export_onnx
    from ichscan.infer.predictor import TorchBackend
    from ichscan.models.bundle import load_bundle

    if args.bundle:
        root, onnx_path = args.bundle, args.work / f"{args.bundle.name}.onnx"
        start = time.perf_counter()
        export_onnx(root, onnx_path)
        print(f"exported {root} in {time.perf_counter() - start:.1f} s: {onnx_path}")
    else:
        root = make_bundle(args.work, args.arch, args.size)
        onnx_path = root / "model.onnx"
        if not onnx_path.exists():
            export_onnx(root)
    bundle = load_bundle(root)
    eager = bundle.members[0]
    name = bundle.config["architecture"]
    size, channels = int(bundle.input["size"]), int(bundle.input["channels"])
    runtime = OnnxPredictor(onnx_path, batch_size=10**6, tta=False, threads=threads)
    if args.cache:
        from ichscan.data.cache import PreparedCache
        from ichscan.infer.inputs import InputSpec, model_channels

        cache = PreparedCache(args.cache)
        rows = range(min(args.slices, len(cache)))
        problem = too_few_slices(len(rows), str(args.cache))
        if problem:
            parser.error(problem)
        planes = np.stack([np.asarray(cache[i]) for i in rows])
        spec = InputSpec.from_bundle(bundle.input)
        x = np.ascontiguousarray(model_channels(planes, spec).transpose(0, 3, 1, 2))
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (args.slices, channels, size, size), dtype=np.uint8)

    @torch.inference_mode()
    def torch_eager(batch: np.ndarray) -> object:
        t = torch.from_numpy(batch)
        emb = eager.embed(t)
        return torch.sigmoid(eager.head(emb)), emb

    backend = TorchBackend(load_bundle(root), torch.device("cpu"), batch_size=10**6, tta=False)
    differ = float(np.abs(runtime.slices(x)[0] - backend.slices(x)[0]).max())

    results: dict[str, dict[str, float]] = {}
    source = f"real slices of {args.cache}" if args.cache else "random uint8 slices"
    weights = f"bundle {args.bundle}" if args.bundle else "random weights"
    print(
        f"{name} at {size} px ({weights}), {len(x)} {source}, {threads} thread(s), "
        f"{platform.processor() or platform.machine()} with {len(os.sched_getaffinity(0))} "
        f"cores; slices/s, best of {args.repeat} round(s), the three paths alternating"
    )
    print(
        f"{'batch':>5} {'torch eager':>12} {'ichscan torch':>14} {'onnxruntime':>12} {'x eager':>8}"
    )
    paths = {"eager": torch_eager, "backend": backend.slices, "ort": runtime.slices}
    for batch in BATCHES:
        rates = slices_per_second(paths, x, batch, args.repeat)
        eager_rate, backend_rate, ort_rate = rates["eager"], rates["backend"], rates["ort"]
        ratio = ort_rate / eager_rate
        results[str(batch)] = {
            "torch_eager": eager_rate,
            "ichscan_torch_channels_last": backend_rate,
            "onnxruntime": ort_rate,
            "onnx_over_eager": ratio,
            "onnx_over_ichscan_torch": ort_rate / backend_rate,
        }
        print(
            f"{batch:>5} {eager_rate:>12.1f} {backend_rate:>14.1f} {ort_rate:>12.1f} {ratio:>7.2f}x"
        )
    print(f"largest |onnxruntime - ichscan torch| probability: {differ:.2g}")
    at32 = results["32"]["onnx_over_eager"]
    if not args.bundle:  # the target is the ResNet18 one
        print(
            f"\ntarget onnxruntime >= 1.5x torch eager at batch 32: {at32:.2f}x "
            f"{'MET' if at32 >= 1.5 else 'NOT MET'}"
        )
    out = args.work / "onnx_vs_torch.json"
    out.write_text(
        json.dumps(
            {
                "architecture": name,
                "size": size,
                "slices": source,
                "threads": threads,
                "max_probability_difference": differ,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
