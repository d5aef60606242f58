"""The benchmarks' own measuring code: what a printed figure says it measured."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Touches LAUNCHER_MIB of memory, then execs the command after it: a benchmark driver whose
# own peak is far above prepare's, as prepare_memory.py's driver is.
LAUNCHER_MIB = 600
LAUNCHER = (
    "import os, sys\n"
    f"b = bytearray({LAUNCHER_MIB} << 20)\n"
    "b[::4096] = b'\\1' * len(range(0, len(b), 4096))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_prepare_memory_reports_prepare_s_own_peak(tmp_path: Path) -> None:
    """The peak of the prepare process, not its launcher's: getrusage's ru_maxrss survives
    exec, so it reported the benchmark driver's 524 MiB as prepare's."""
    from ichscan.data.manifest import write_manifest
    from ichscan.labels import RSNA

    bench = benchmark("prepare_memory")
    paths = bench.write_synthetic_slices(tmp_path / "dicom", 2)
    manifest = write_manifest(bench.repeated_manifest(paths, 4), tmp_path / "m.parquet", RSNA)
    child = [str(BENCHMARKS / "prepare_memory.py"), "--child", str(manifest), str(tmp_path / "c")]
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *child], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.splitlines()[-1])
    assert figures["n_ok"] == 4
    assert 20 < figures["prepare_peak"] < LAUNCHER_MIB - 100


def test_onnx_vs_torch_refuses_fewer_slices_than_its_largest_batch() -> None:
    """A 'batch 32' row over 8 slices timed one batch of 8 under the batch-32 target."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "onnx_vs_torch.py"), "--slices", "8", "--size", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "--slices: 8 slices, fewer than the largest batch (32); that row would time a batch "
            "of 8: give --slices 32 or more"
        )
    )


def test_onnx_vs_torch_alternates_its_paths_over_rounds() -> None:
    """The three paths take turns in every round, so a change of load lands on all three
    instead of in one path's block and in the ratio."""
    bench = benchmark("onnx_vs_torch")
    calls: list[tuple[str, int]] = []

    def path(name: str):
        return lambda batch: calls.append((name, len(batch)))

    runs = {name: path(name) for name in ("eager", "backend", "ort")}
    rates = bench.slices_per_second(runs, np.zeros((64, 1), np.uint8), 32, repeat=3)
    assert set(rates) == set(runs) and all(r > 0 for r in rates.values())
    order = [name for name, _ in calls[::2]]  # two batches of 32 per pass
    assert order == ["eager", "backend", "ort"] * 4  # the warm-up, then 3 rounds
    assert {size for _, size in calls} == {32}
