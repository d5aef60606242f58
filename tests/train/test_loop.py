"""Training end to end on tiny data: bundle, logs, checkpoints, resume, modes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ichscan.data.synth import write_synthetic
from ichscan.errors import IchscanError
from ichscan.infer.predictor import Predictor
from ichscan.models.bundle import load_bundle
from ichscan.train.augment import AugmentSpec
from ichscan.train.loop import TrainConfig, TrainingError, train

FAST = dict(
    architecture="resnet18",
    pretrained="none",
    size=32,
    batch_size=8,
    epochs=2,
    folds=3,
    workers=0,
    progress=False,
    tensorboard=False,
)


@pytest.fixture(scope="module")
def png_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthpng") / "set"
    write_synthetic(root, n_scans=18, seed=3, layout="png", shape=(8, 64, 64))
    return root


def test_train_writes_a_complete_bundle(png_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    summary = train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    bundle = load_bundle(out)
    assert bundle.config["label_set"] == "rsna"
    assert set(bundle.thresholds) == set(bundle.labels)
    assert bundle.input["size"] == 32 and bundle.input["source_window"] == "brain"
    assert "random initialisation" in bundle.config["weights_provenance"]
    assert bundle.config["training"]["epochs_run"] == 2
    assert bundle.config["training"]["data_summary"]["synthetic"] is True
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [0, 1]
    assert {"train_loss", "val_loss", "val_mean_auc"} <= set(log.columns)
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last.pt").exists()
    assert "validation" in summary["metrics"]
    # fine-tuning keeps Youden's J on the validation fold unless told otherwise
    assert bundle.config["threshold_method"] == "youden on the validation fold"


def test_threshold_rule_is_checked_before_any_work(png_set: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="--threshold must be"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "m"), threshold="best", **FAST))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("rule", ["youden", "calibrated", "sensitivity:0.9"])
def test_a_diverged_model_is_named_not_thresholded(rule: str) -> None:
    """NaN validation outputs: one line on the cause, not a threshold read off garbage or a
    ValueError from deep in the threshold rule."""
    from ichscan.train.loop import choose_threshold

    y = np.array([0, 1, 0, 1])
    with pytest.raises(TrainingError, match="2 of 4 validation probabilities are NaN"):
        choose_threshold(y, np.array([0.1, np.nan, 0.2, np.nan]), rule)


def test_scan_thresholds_are_chosen_on_the_max_over_each_scans_slices() -> None:
    """The scan score is the max over slices: its threshold is chosen on those maxima and the
    scans' labels, by the same rule; single-slice scans need none of their own."""
    from ichscan.labels import BINARY
    from ichscan.train.loop import choose_scan_thresholds

    # Negative scans whose busiest slice reaches 0.6 and 0.7; positives at 0.8 and 0.9:
    # the slice-level threshold would sit lower, the scan-level one between 0.7 and 0.8.
    probs = np.array([[0.1], [0.6], [0.2], [0.7], [0.3], [0.8], [0.5], [0.9]])
    labels = np.array([[0], [0], [0], [0], [0], [1], [0], [1]])
    scans = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    chosen = choose_scan_thresholds(probs, labels, scans, BINARY, "youden")
    assert chosen is not None and 0.7 < chosen["hemorrhage"] <= 0.8
    alone = np.array(list("abcdefgh"))
    assert choose_scan_thresholds(probs, labels, alone, BINARY, "youden") is None


def test_resolve_threshold_defaults_per_recipe() -> None:
    from ichscan.train.loop import resolve_threshold

    assert resolve_threshold("auto", "small-set") == "calibrated"
    assert resolve_threshold("auto", "finetune") == "youden"
    assert resolve_threshold("sensitivity:0.9", "small-set") == "sensitivity:0.9"


def test_bundle_from_a_cropped_cache_crops_at_predict_time(png_set: Path, tmp_path: Path) -> None:
    from ichscan.cli import main
    from ichscan.preprocess.head_crop import CROP_VERSION

    cache = tmp_path / "cache"
    args = ["prepare", str(png_set), "--out", str(cache), "--size", "32", "--crop", "brain"]
    assert main([*args, "--workers", "1"]) == 0
    out = tmp_path / "model"
    train(TrainConfig(data=str(cache), out=str(out), **{**FAST, "epochs": 1, "folds": 5}))
    spec = load_bundle(out).input
    assert (spec["crop"], spec["crop_version"]) == ("brain", CROP_VERSION)


def test_each_recipe_refuses_the_other_ones_crop(png_set: Path, tmp_path: Path) -> None:
    """A brain-only cache lacks the head plane --head-reader reads; a brain+head cache holds
    a plane that --no-head-reader would leave unread and a fine-tuned network would take for
    a window. Each is refused up front."""
    from ichscan.cli import main
    from ichscan.train.data import DataError

    for crop in ("brain", "brain+head"):
        args = ["prepare", str(png_set), "--out", str(tmp_path / crop), "--size", "320"]
        assert main([*args, "--crop", crop, "--workers", "1"]) == 0
    head_reader = {"recipe": "small-set", "head_reader": True}
    with pytest.raises(DataError, match="--head-reader needs a cache prepared with --crop brain"):
        train(TrainConfig(data=str(tmp_path / "brain"), out=str(tmp_path / "a"), **head_reader))
    no_head_reader = {"recipe": "small-set", "head_reader": False}
    with pytest.raises(
        DataError, match="--no-head-reader needs a cache prepared with --crop brain at"
    ):
        train(
            TrainConfig(
                data=str(tmp_path / "brain+head"), out=str(tmp_path / "d"), **no_head_reader
            )
        )
    with pytest.raises(DataError, match="prepare another with --crop brain to fine-tune"):
        train(
            TrainConfig(
                data=str(tmp_path / "brain+head"), out=str(tmp_path / "b"), recipe="finetune"
            )
        )
    with pytest.raises(DataError, match="--head-reader is a small-set option"):
        train(
            TrainConfig(
                data=str(png_set), out=str(tmp_path / "c"), recipe="finetune", head_reader=True
            )
        )


def test_small_set_refuses_fine_tuning_options(png_set: Path, tmp_path: Path) -> None:
    """--arch or --epochs under the small-set recipe would be ignored without a word."""
    from ichscan.train.data import DataError

    small_set = {"recipe": "small-set", "labels": "binary"}
    with pytest.raises(DataError, match=r"--arch, --epochs are fine-tuning option\(s\)"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(tmp_path / "m"),
                architecture="resnet18",
                epochs=3,
                **small_set,
            )
        )
    assert not (tmp_path / "m" / "cache").exists(), "refused before any work"


def test_resume_continues_where_it_stopped(png_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    resumed = train(
        TrainConfig(data=str(png_set), out=str(out), resume=True, **{**FAST, "epochs": 3})
    )
    assert resumed["training"]["epochs_run"] == 3
    assert list(pd.read_csv(out / "train_log.csv")["epoch"]) == [0, 1, 2]


def test_select_last_keeps_the_last_epoch_and_never_stops_early(
    png_set: Path, tmp_path: Path
) -> None:
    """Cross-validation scores the validation fold: `--select last` must not pick an epoch
    on it, nor stop on it."""
    out = tmp_path / "model"
    config = {**FAST, "epochs": 3, "patience": 1, "select": "last"}
    summary = train(TrainConfig(data=str(png_set), out=str(out), **config))
    assert summary["training"]["epochs_run"] == 3
    assert summary["training"]["best_epoch"] == 3
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    kept = load_bundle(out).members[0].state_dict()
    for name, tensor in last["model"].items():
        torch.testing.assert_close(kept[name], tensor, rtol=0, atol=0)


def test_a_fresh_run_never_takes_an_earlier_runs_best_weights(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a folder that holds an earlier run: when no epoch of the new run improves on the
    start (--select auc with undefined AUCs), the bundle must hold the new run's weights,
    not the old best.pt."""
    import ichscan.train.loop as loop

    out = tmp_path / "model"
    config = {**FAST, "epochs": 1, "select": "auc"}
    train(TrainConfig(data=str(png_set), out=str(out), **config))
    old = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    real = loop.evaluate_rows
    monkeypatch.setattr(loop, "evaluate_rows", lambda *a: {**real(*a), "mean_auc": float("nan")})
    train(TrainConfig(data=str(png_set), out=str(out), **{**config, "seed": 7}))
    last = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    kept = load_bundle(out).members[0].state_dict()
    assert any(not torch.equal(kept[k], old[k]) for k in old)
    for name, tensor in last["model"].items():
        torch.testing.assert_close(kept[name], tensor, rtol=0, atol=0)


def test_finetune_crop_is_cut_recorded_and_checked(png_set: Path, tmp_path: Path) -> None:
    from ichscan.data.cache import PreparedCache
    from ichscan.train.data import DataError

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), crop="brain", **{**FAST, "epochs": 1}))
    assert PreparedCache(out / "cache").crop == "brain"
    assert load_bundle(out).input["crop"] == "brain"  # predict cuts the same square
    with pytest.raises(DataError, match="prepared with --crop brain"):
        train(TrainConfig(data=str(out / "cache"), out=str(tmp_path / "b"), crop="head", **FAST))
    with pytest.raises(DataError, match="--crop head is for fine-tuning"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(tmp_path / "c"),
                recipe="small-set",
                labels="binary",
                crop="head",
            )
        )
    with pytest.raises(TrainingError, match="--crop must be one of none, head, brain"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "d"), crop="brain+head", **FAST))


@pytest.mark.parametrize("rank", [0, 1])
def test_more_ranks_than_gpus_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """NCCL cannot share a GPU between ranks: two ranks on a one-GPU node say so, rank 0
    too (the only rank whose errors are printed)."""
    from ichscan.train import distributed

    def no_gpu_work(*_: object, **__: object) -> None:
        raise AssertionError("a rank went on to its GPU")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu_work)
    with pytest.raises(
        TrainingError, match=r"2 processes, but this node has 1 GPU.*--nproc_per_node 1"
    ):
        distributed.init_from_env()


def test_a_launch_without_local_world_size_needs_only_its_own_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """srun sets no LOCAL_WORLD_SIZE: rank 2 of 4 on two one-GPU nodes is not refused for
    the world's size, and takes its node's GPU."""
    from ichscan.train import distributed

    used: list[int] = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", used.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    ctx = distributed.init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, used) == (2, 4, 0, [0])


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_torchrun_only_rank_0_prints_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rank: str
) -> None:
    """Every rank runs the same checks, so each error would be printed once per rank; the
    other ranks exit with the same code and nothing on stderr (usage errors too)."""
    from ichscan.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    # refused before torch.distributed starts: no process group needed here
    argv = ["train", str(tmp_path), "--out", str(tmp_path / "m"), "--arch", "resnet17"]
    assert main(argv) == 2
    with pytest.raises(SystemExit) as usage:
        main(["train", str(tmp_path), "--epochs", "many"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert err.count("ichscan train: error: unknown architecture") == 1
        assert "--epochs" in err
    else:
        assert err == ""


def test_resume_with_another_architecture_is_refused(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    with pytest.raises(TrainingError, match="--arch resnet18 in the checkpoint, alexnet now"):
        train(
            TrainConfig(
                data=str(png_set), out=str(out), resume=True, **{**FAST, "architecture": "alexnet"}
            )
        )
    # refused before the data are prepared again (hours on a large set)
    import ichscan.train.loop as loop

    def prepared(*_: object, **__: object) -> None:
        raise AssertionError("the data were prepared before the resume was checked")

    monkeypatch.setattr(loop, "resolve_training_data", prepared)
    for change in ({"size": 48}, {"crop": "brain"}):
        with pytest.raises(TrainingError, match="different"):
            train(TrainConfig(data=str(png_set), out=str(out), resume=True, **{**FAST, **change}))


def test_head_only_training_keeps_the_backbone(png_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    torch.manual_seed(0)
    train(
        TrainConfig(
            data=str(png_set),
            out=str(out),
            train_mode="head",
            seed=0,
            augment=AugmentSpec.off(),
            **FAST,
        )
    )
    from ichscan.models.slice_model import SliceModel

    torch.manual_seed(0)
    fresh = SliceModel("resnet18", 6, pretrained="none", dropout=0.3)
    trained = load_bundle(out).members[0]
    torch.testing.assert_close(trained.backbone.conv1.weight, fresh.backbone.conv1.weight)
    assert not torch.equal(trained.head[1].weight, fresh.head[1].weight)


def test_binary_model_from_rsna_labels(png_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), labels="binary", **FAST))
    assert load_bundle(out).labels == ["hemorrhage"]


def test_unknown_architecture_fails_before_any_work(png_set: Path, tmp_path: Path) -> None:
    with pytest.raises(IchscanError, match="unknown architecture"):
        train(
            TrainConfig(
                data=str(png_set), out=str(tmp_path / "m"), **{**FAST, "architecture": "resnet17"}
            )
        )
    assert not (tmp_path / "m").exists()


def test_label_set_that_does_not_match(png_set: Path, tmp_path: Path) -> None:
    with pytest.raises(IchscanError, match="cq500"):
        train(
            TrainConfig(data=str(png_set), out=str(tmp_path / "m"), **{**FAST, "labels": "cq500"})
        )


def test_one_class_only(tmp_path: Path) -> None:
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    from PIL import Image

    rows = []
    for i in range(12):
        Image.fromarray(np.full((32, 32), i * 10, np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"id": i, "hemorrhage": 0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    with pytest.raises(TrainingError, match="only one class"):
        train(TrainConfig(data=str(root), out=str(tmp_path / "m"), **FAST))


def test_more_folds_than_patients(png_set: Path, tmp_path: Path) -> None:
    with pytest.raises(IchscanError, match="fold"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "m"), **{**FAST, "folds": 40}))


def test_no_space_for_checkpoints(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(TrainingError, match="free for checkpoints"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "m"), **FAST))


# Rank 1's clock runs an hour ahead once training has started: past --max-minutes 30 after
# its first epoch, while rank 0's is not.
RANK1_CLOCK_AHEAD = """
import time
import ichscan.train.loop as loop
if os.environ["RANK"] == "1":
    class Ahead:
        calls = 0

        @staticmethod
        def monotonic():
            Ahead.calls += 1
            return time.monotonic() + (3600 if Ahead.calls > 1 else 0)

    loop.time = Ahead
"""


@pytest.fixture(scope="module")
def png_cache(png_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """png_set prepared at 32 px in 3 folds: what torchrun trains on."""
    from ichscan.cli import main

    cache = tmp_path_factory.mktemp("synthpng_cache") / "cache"
    argv = ["prepare", str(png_set), "--out", str(cache), "--size", "32", "--folds", "3"]
    assert main([*argv, "--workers", "1"]) == 0
    return cache


def torchrun(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 script args` on a free port (tests run in parallel)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def torchrun_two_ranks(
    png_cache: Path,
    tmp_path: Path,
    env: dict[str, str],
    setup: str = "",
    options: dict[str, object] | None = None,
) -> list[str]:
    """`torchrun --nproc_per_node 2` of one short epoch (``options``: more TrainConfig
    arguments; ``setup``: code each rank runs first); each rank's final weights digest."""
    script = tmp_path / "run.py"
    out = tmp_path / "ddp_model"
    script.write_text(
        "import dataclasses, json, os\n"
        "from ichscan.train.loop import TrainConfig, train\n"
        f"{setup}\n"
        f"cfg = TrainConfig(data={str(png_cache)!r}, out={str(out)!r}, architecture='resnet18',"
        " pretrained='none', size=32, batch_size=4, epochs=1, folds=3, workers=0,"
        " progress=False, tensorboard=False)\n"
        f"cfg = dataclasses.replace(cfg, **{options or {}!r})\n"
        "s = train(cfg)\n"
        f"open(os.path.join({str(tmp_path)!r}, f\"rank{{s['rank']}}.json\"), 'w')"
        ".write(json.dumps(s['final_weights_sha256']))\n"
    )
    proc = torchrun(script, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "bundle.json").exists()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


# Each rank notes how many rows every validation pass of the training loop predicted.
COUNT_VALIDATION_ROWS = """
import ichscan.train.loop as loop
_predict_rows = loop.predict_rows

def counted(model, dataset, *args, **kwargs):
    with open(f"{os.environ['RANK_LOG']}{os.environ['RANK']}.txt", "a") as f:
        f.write(f"{len(dataset)}\\n")
    return _predict_rows(model, dataset, *args, **kwargs)

loop.predict_rows = counted
"""


def test_ddp_two_cpu_processes_agree_on_weights(png_cache: Path, tmp_path: Path) -> None:
    """The same command under torchrun: 2 gloo ranks, short epochs, identical weights; and
    --max-minutes decided by rank 0's clock, so a rank whose clock is past the limit goes
    on with the others instead of leaving them waiting in an all-reduce. Each epoch's
    validation is split between the ranks (each predicts its share, the probabilities
    gathered in row order), and the bundle records the 2 processes and the batch they
    made together."""
    # CPU processes even on a GPU machine: two NCCL ranks cannot share one GPU.
    sums = torchrun_two_ranks(
        png_cache,
        tmp_path,
        {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK_LOG": str(tmp_path / "val")},
        setup=RANK1_CLOCK_AHEAD + COUNT_VALIDATION_ROWS,
        options={"epochs": 2, "max_minutes": 30, "select": "last"},
    )
    assert sums[0] == sums[1]
    out = tmp_path / "ddp_model"
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [0, 1]
    training = load_bundle(out).config["training"]
    assert training["processes"] == 2 and training["effective_batch_size"] == 2 * 4
    validation = training["data_summary"]["validation_slices"]
    passes = [[int(n) for n in (tmp_path / f"val{r}.txt").read_text().split()] for r in (0, 1)]
    # rank 0: a half each epoch, then the whole fold for the thresholds; rank 1: its half
    assert passes[0] == [(validation + 1) // 2] * 2 + [validation]
    assert passes[1] == [validation // 2] * 2
    # the gathered halves in row order: --select last keeps the last epoch's weights, which
    # rank 0 then scores on the whole fold, as the last epoch's split pass did
    final = load_bundle(out).config["metrics"]["validation"]["weighted_log_loss"]
    assert abs(final - log["val_loss"].iloc[-1]) < 1e-5


def test_torchrun_refuses_raw_data_in_one_line_from_rank_0(png_set: Path, tmp_path: Path) -> None:
    """Under torchrun a dataset folder (not a prepared cache) is refused before any work:
    rank 0 alone would prepare it while the others time out waiting. The line is printed
    once (rank 0), the other rank exits with the same code quietly; the small-set recipe
    is refused as early."""
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom ichscan.cli import main\nsys.exit(main())\n")
    out = tmp_path / "m"
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = torchrun(script, "train", str(png_set), "--out", str(out), env=env)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ichscan train: error:")]
    assert lines == [
        f"ichscan train: error: {png_set}: under torchrun, training reads a prepared cache; "
        f"prepare the cache first: ichscan prepare {png_set} --out CACHE, then torchrun ... "
        "train CACHE"
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "prepare the cache first: ichscan prepare"),
        ({"recipe": "small-set", "labels": "binary"}, "small-set recipe runs in one process"),
    ],
)
def test_torchrun_refusals_come_before_any_preparation(
    png_set: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, str],
    error: str,
) -> None:
    """Each rank refuses raw data and the small-set recipe before rank 0 prepares anything
    (which on RSNA takes longer than the other ranks' collective timeout)."""
    import ichscan.train.loop as loop
    from ichscan.train.distributed import DistContext

    def prepared(*_: object, **__: object) -> None:
        raise AssertionError("the data were prepared before torchrun's limits were checked")

    # A rank of two, as torchrun starts it; nothing collective runs before the refusal.
    monkeypatch.setattr(loop.dist_utils, "init_from_env", lambda: DistContext(0, 2))
    monkeypatch.setattr(loop, "resolve_training_data", prepared)
    out = tmp_path / "m"
    with pytest.raises(TrainingError, match=error):
        train(TrainConfig(data=str(png_set), out=str(out), **{**FAST, **options}))
    assert not out.exists()


@pytest.mark.gpu
def test_training_on_a_gpu_uses_mixed_precision_and_predicts_on_the_cpu(
    png_set: Path, tmp_path: Path
) -> None:
    """`--device cuda`: AMP with a gradient scaler, a bundle that loads and predicts on a
    machine without a GPU as it does on the GPU."""
    from ichscan.data.cache import PreparedCache
    from ichscan.train.cv import bundle_probabilities

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **{**FAST, "device": "cuda"}))
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["scaler"].get("scale") is not None, "the gradient scaler was not on"
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    cache = PreparedCache(out / "cache")
    rows = np.arange(len(cache))
    on_gpu = bundle_probabilities(out, cache, rows, torch.device("cuda"))
    on_cpu = bundle_probabilities(out, cache, rows, torch.device("cpu"))
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"
)
def test_ddp_two_gpus_agree_on_weights(png_cache: Path, tmp_path: Path) -> None:
    """torchrun with NCCL, one rank per GPU: identical weights at the end."""
    sums = torchrun_two_ranks(png_cache, tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert sums[0] == sums[1]


def test_train_study_adds_a_sequence_model(tmp_path: Path) -> None:
    from ichscan.train.study import StudyConfig, train_study

    data = tmp_path / "dicom"
    write_synthetic(data, n_scans=9, seed=5, layout="dicom", shape=(8, 48, 48))
    out = tmp_path / "model"
    train(TrainConfig(data=str(data), out=str(out), **FAST))
    result = train_study(StudyConfig(model=str(out), epochs=3, hidden=16, progress=False))
    bundle = load_bundle(out)
    assert bundle.study is not None
    assert bundle.config["study_model"]["kind"] == "gru"
    assert result["validation_scans"] >= 1
    assert {"slice_mean_auc", "scan_mean_auc"} <= set(result["validation"])
    assert not list(out.glob(".study-embeddings-*")), "the embeddings file outlived training"
    # Its probabilities replace the slice model's, so its own thresholds decide.
    study_thresholds = bundle.config["study_model"]["thresholds"]
    assert set(study_thresholds) == set(bundle.labels)
    assert "study model's validation" in bundle.config["study_model"]["threshold_method"]
    predictor = Predictor(out, device="cpu")
    expected = [study_thresholds[name] for name in bundle.labels]
    np.testing.assert_array_equal(predictor.thresholds, expected)


def test_train_study_refuses_one_slice_scans(tmp_path: Path) -> None:
    """A folder of PNG slices is one-slice 'scans': a sequence model over them is refused
    rather than silently replacing the slice model's probabilities."""
    from ichscan.train.study import StudyConfig, StudyTrainingError, train_study

    data = tmp_path / "slices"
    write_synthetic(data, n_scans=18, seed=3, layout="png", shape=(1, 64, 64))
    out = tmp_path / "model"
    train(TrainConfig(data=str(data), out=str(out), **FAST))
    with pytest.raises(StudyTrainingError, match="18 of 18 scans are a single slice"):
        train_study(StudyConfig(model=str(out), epochs=1, progress=False))
    assert load_bundle(out).study is None


def test_train_study_refuses_a_full_disk_before_embedding(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from ichscan.train import study
    from ichscan.train.study import StudyConfig, StudyTrainingError, train_study

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    monkeypatch.setattr(study.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(StudyTrainingError, match="MB free, the slice embeddings need"):
        train_study(StudyConfig(model=str(out), epochs=1, progress=False))
    assert not list(out.glob(".study-embeddings-*"))


def test_study_embeddings_on_disk_equal_those_in_memory(png_set: Path, tmp_path: Path) -> None:
    from ichscan.data.cache import PreparedCache
    from ichscan.train.study import embed_cache

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    bundle, cache = load_bundle(out), PreparedCache(out / "cache")
    in_memory = embed_cache(bundle, cache, torch.device("cpu"))
    mapped = embed_cache(bundle, cache, torch.device("cpu"), path=tmp_path / "e.npy")
    assert isinstance(mapped, np.memmap)
    assert mapped.shape == (len(cache), bundle.members[0].embed_dim)
    np.testing.assert_array_equal(mapped, in_memory)


def test_extra_training_data_is_never_validated(png_set: Path, tmp_path: Path) -> None:
    from ichscan.data.cache import PreparedCache

    extra = tmp_path / "extra"
    write_synthetic(extra, n_scans=6, seed=9, layout="png", shape=(8, 64, 64))
    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), extra_train=(str(extra),), **FAST))
    cache = PreparedCache(out / "cache")
    extra_rows = cache.index["patient_id"].str.startswith("extra:")
    assert extra_rows.sum() == 6
    assert (cache.index.loc[extra_rows, "fold"] == -2).all()


def test_cross_validation_pools_out_of_fold_predictions(png_set: Path, tmp_path: Path) -> None:
    from ichscan.train.cv import cross_validate

    cv = cross_validate(
        str(png_set),
        str(tmp_path / "cv"),
        folds=3,
        **{k: v for k, v in FAST.items() if k != "folds"},
    )
    assert len(cv["y"]) == len(cv["p"]) == 18
    assert sorted(set(cv["fold"].tolist())) == [0, 1, 2]
    # every image scored once, named as in the cache
    assert len(set(cv["image_id"].tolist())) == 18
    assert len(cv["minutes"]) == 3
    assert cv["recipes"] == {"finetune"}


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its first epoch and resumed, a run ends with the weights, bit for bit,
    of the same run never interrupted: the shuffle order, augmentation and dropout go on
    from where they were."""
    import ichscan.train.loop as loop

    # On the CPU: cuDNN's convolution gradients need not be reproducible bit for bit.
    config = {**FAST, "epochs": 3, "seed": 7, "device": "cpu"}
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    train(TrainConfig(data=str(png_set), out=str(whole), **config))

    class Killed(Exception):
        pass

    save = loop._save_checkpoint

    def save_then_die(path, model, optimizer, scheduler, scaler, epoch, *rest):
        save(path, model, optimizer, scheduler, scaler, epoch, *rest)
        if epoch == 0:
            raise Killed

    monkeypatch.setattr(loop, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(TrainConfig(data=str(png_set), out=str(crashed), **config))
    monkeypatch.undo()
    train(TrainConfig(data=str(png_set), out=str(crashed), resume=True, **config))

    def final(out: Path) -> dict[str, torch.Tensor]:
        path = out / "checkpoints" / "last.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["model"]

    a, b = final(whole), final(crashed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    logs = [pd.read_csv(out / "train_log.csv") for out in (whole, crashed)]
    np.testing.assert_array_equal(logs[0]["train_loss"], logs[1]["train_loss"])


def test_resume_refuses_other_training_settings_before_the_data(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run that would train otherwise than its checkpoint (another mode, schedule,
    learning rate, seed, batch, data...) is refused in one line naming each setting and what
    the checkpoint has, before any data are prepared; a longer cosine run is allowed."""
    import ichscan.train.loop as loop

    out = tmp_path / "model"
    base = {**FAST, "epochs": 1, "seed": 7}
    train(TrainConfig(data=str(png_set), out=str(out), **base))

    def prepared(*_: object, **__: object) -> None:
        raise AssertionError("the data were prepared before the resume was checked")

    monkeypatch.setattr(loop, "resolve_training_data", prepared)
    other = tmp_path / "other"
    other.mkdir()
    cases = [
        ({"train_mode": "head"}, ["--train all in the checkpoint, head now"]),
        ({"schedule": "onecycle"}, ["--schedule cosine in the checkpoint, onecycle now"]),
        (
            {"seed": 99, "lr": 0.1, "batch_size": 16},
            [
                "--batch-size 8 in the checkpoint, 16 now",
                "--lr 0.001 in the checkpoint, 0.1 now",
                "--seed 7 in the checkpoint, 99 now",
            ],
        ),
        ({"augment": AugmentSpec.off()}, ["--no-augment on in the checkpoint, off"]),
        ({"data": str(other)}, [f"DATA {png_set.resolve()} in the checkpoint, {other.resolve()}"]),
    ]
    for change, named in cases:
        config = {**base, "data": str(png_set), **change}
        with pytest.raises(TrainingError) as err:
            train(TrainConfig(out=str(out), resume=True, **config))
        message = str(err.value)
        assert "\n" not in message
        for part in named:
            assert part in message, message
    monkeypatch.undo()
    onecycle = tmp_path / "onecycle"
    train(TrainConfig(data=str(png_set), out=str(onecycle), schedule="onecycle", **base))
    with pytest.raises(TrainingError, match="one-cycle schedule cannot be stretched"):
        train(
            TrainConfig(
                data=str(png_set),
                out=str(onecycle),
                schedule="onecycle",
                resume=True,
                **{**base, "epochs": 2},
            )
        )


def test_resume_without_a_checkpoint_is_refused_before_the_data(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ichscan.train.loop as loop

    def prepared(*_: object, **__: object) -> None:
        raise AssertionError("the data were prepared before the resume was checked")

    monkeypatch.setattr(loop, "resolve_training_data", prepared)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "m"), resume=True, **FAST))


@pytest.mark.parametrize("name", ["epochs", "batch_size", "accumulate"])
def test_counts_below_one_are_refused_before_any_work(
    png_set: Path, tmp_path: Path, name: str
) -> None:
    """--epochs 0 would write an untrained bundle; --accumulate 0 and --batch-size 0 crash."""
    with pytest.raises(TrainingError, match="must be a whole number of 1 or more, not 0"):
        train(TrainConfig(data=str(png_set), out=str(tmp_path / "m"), **{**FAST, name: 0}))
    assert not (tmp_path / "m").exists()


def test_the_disk_check_counts_what_the_checkpoints_take(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """best.pt, last.pt (weights and AdamW's moments) and last.pt's temporary copy must fit:
    with a little less room than that, the run is refused before its first epoch."""
    import shutil
    from collections import namedtuple

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **{**FAST, "epochs": 1}))
    ckpt = out / "checkpoints"
    peak = (ckpt / "best.pt").stat().st_size + 2 * (ckpt / "last.pt").stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 0, int(peak * 0.95)))
    with pytest.raises(TrainingError, match="free for checkpoints"):
        train(TrainConfig(data=str(out / "cache"), out=str(tmp_path / "b"), **FAST))


def test_a_failed_checkpoint_save_is_one_line_and_leaves_no_partial_file(
    png_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up during a save reaches torch's zip writer as a RuntimeError."""

    def full_disk(obj: object, path: Path) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 105938624 vs "
            "105938512\nframe #0: c10::ThrowEnforceNotMet"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "m"
    with pytest.raises(IchscanError, match=r"cannot write weights.*free some disk") as err:
        train(TrainConfig(data=str(png_set), out=str(out), **FAST))
    assert "\n" not in str(err.value)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_a_cache_split_or_sized_otherwise_is_refused(png_set: Path, tmp_path: Path) -> None:
    """The cache's folds and size are what a run trains on: another --folds or --size would
    be recorded in the bundle without being true."""
    from ichscan.cli import main
    from ichscan.train.data import DataError

    cache = tmp_path / "cache"
    args = ["prepare", str(png_set), "--out", str(cache), "--size", "32", "--folds", "3"]
    assert main([*args, "--workers", "1"]) == 0
    config = {**FAST, "data": str(cache)}
    with pytest.raises(DataError, match=r"split into 3 folds .* not --folds 5: pass --folds 3"):
        train(TrainConfig(out=str(tmp_path / "a"), **{**config, "folds": 5}))
    with pytest.raises(DataError, match="split into 3 folds"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**config, "folds": 20, "fold": 15}))
    with pytest.raises(DataError, match="holds 32 px slices, not --size 48: pass --size 32"):
        train(TrainConfig(out=str(tmp_path / "c"), **{**config, "size": 48}))


def test_a_short_last_accumulation_group_is_averaged_over_what_it_holds() -> None:
    """Batches of 8 accumulated by 2 over 40 samples are the steps 16, 16 and 8 of batches of
    16: the last step's gradient is its one batch's, not half of it."""
    import math

    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ichscan.train.loop import _train_epoch, config_from_kwargs

    torch.manual_seed(0)
    x, y = torch.randn(40, 5), (torch.rand(40, 2) > 0.5).float()

    def weights_after(batch_size: int, accumulate: int) -> torch.Tensor:
        torch.manual_seed(1)
        model = nn.Linear(5, 2)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        config = config_from_kwargs(accumulate=accumulate, progress=False)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        args = (torch.ones(2), None, config, torch.device("cpu"), False, 0, False)
        _train_epoch(model, loader, optimizer, schedule, scaler, *args)
        assert schedule.last_epoch == math.ceil(len(loader) / accumulate)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(weights_after(8, 2), weights_after(16, 1), rtol=0, atol=1e-6)


def test_cross_validation_scores_what_predict_does(png_set: Path, tmp_path: Path) -> None:
    """A fine-tuned bundle names no flip: cross-validation's probabilities are those the
    thresholds were chosen on and predict computes, not flip-averaged ones."""
    from ichscan.data.cache import PreparedCache
    from ichscan.train.cv import bundle_probabilities
    from ichscan.train.dataset import SliceDataset
    from ichscan.train.loop import predict_rows

    out = tmp_path / "model"
    train(TrainConfig(data=str(png_set), out=str(out), **{**FAST, "epochs": 1}))
    bundle, cache = load_bundle(out), PreparedCache(out / "cache")
    assert "hflip" not in bundle.input["tta"]
    rows = np.flatnonzero(cache.index["fold"].to_numpy() == 0)
    cpu = torch.device("cpu")
    unflipped = predict_rows(bundle.members[0], SliceDataset(cache, rows), cpu, 32)
    np.testing.assert_allclose(bundle_probabilities(out, cache, rows, cpu), unflipped, atol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "conv"])
def test_study_validation_outputs_do_not_depend_on_the_other_scans(kind: str) -> None:
    """The study model's validation outputs (its thresholds are chosen on them) are what
    predict computes for each scan alone, whatever the lengths of the scans beside it."""
    from ichscan.models.study import StudyModel
    from ichscan.train.study import _outputs

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float16)
    labels = (rng.random((40, 2)) > 0.5).astype(np.float32)
    groups = [np.arange(0, 5), np.arange(5, 17), np.arange(17, 20), np.arange(20, 32)]
    model = StudyModel(8, 2, kind=kind, hidden=16).eval()
    slice_p, _, scan_p, _ = _outputs(model, groups, emb, labels, torch.device("cpu"))
    with torch.no_grad():
        alone = [model(torch.from_numpy(emb[g].astype(np.float32))[None]) for g in groups]
    expected_slices = np.concatenate([torch.sigmoid(s[0]).numpy() for s, _ in alone])
    expected_scans = np.stack([torch.sigmoid(c[0]).numpy() for _, c in alone])
    np.testing.assert_allclose(slice_p, expected_slices, atol=1e-6)
    np.testing.assert_allclose(scan_p, expected_scans, atol=1e-6)


def test_study_training_batches_hold_scans_of_one_length() -> None:
    """The study model trains without padding too: every scan once per epoch, in batches of
    scans of one length."""
    from ichscan.train.study import length_batches

    groups = [np.arange(n) for n in (5, 12, 5, 3, 12, 5, 5, 7)]
    batches = length_batches(groups, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(groups)))
    assert all(len({len(groups[i]) for i in b}) == 1 and len(b) <= 2 for b in batches)
