"""`ichscan train`: fit a slice classifier on any dataset layout or prepared cache.

One process on CPU or GPU by default; the same code under `torchrun --nproc_per_node N`
runs DistributedDataParallel with a distributed sampler (gloo on CPU, NCCL on GPU), and only
rank 0 writes anything.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ichscan.data.cache import PreparedCache
from ichscan.errors import IchscanError
from ichscan.evaluate.metrics import (
    calibrated_threshold,
    roc_auc,
    threshold_for_sensitivity,
    weighted_log_loss,
    youden_threshold,
)
from ichscan.labels import LabelSet, get_label_set, scan_truth
from ichscan.models.backbones import get_spec
from ichscan.models.bundle import atomic_torch_save, input_spec, new_config, save_bundle
from ichscan.models.slice_model import SliceModel
from ichscan.train import distributed as dist_utils
from ichscan.train.augment import AugmentSpec, build_augment
from ichscan.train.data import FINETUNE_ONLY, resolve_training_data
from ichscan.train.dataset import SliceDataset

RECIPES = ("auto", "small-set", "finetune")
THRESHOLD_METHODS = ("auto", "youden", "calibrated")
SELECTIONS = ("loss", "auc", "last")
# brain+head is a small-set cut: its second plane is no window a fine-tuned network could read
FINETUNE_CROPS = ("none", "head", "brain")
DEFAULT_ARCHITECTURE = "efficientnet_lite0"


class TrainingError(IchscanError):
    """A training run that cannot start or continue: said before hours are lost."""


@dataclass
class TrainConfig:
    data: str
    out: str
    architecture: str = "efficientnet_lite0"  # DEFAULT_ARCHITECTURE
    pretrained: str = "imagenet"
    train_mode: str = "all"  # "head": frozen backbone (as the seeds did); "all": fine-tune
    labels: str | None = None
    input_kind: str = "windows"
    windows: tuple[str, ...] = ("brain", "subdural", "bone")
    size: int = 256
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    accumulate: int = 1
    fold: int = 0
    folds: int = 5
    seed: int = 0
    pos_weight: bool = False
    patience: int = 6
    # The weights kept: the best epoch by validation weighted log loss ("loss") or mean AUC
    # ("auc"), or the last epoch ("last": no selection and no early stopping, for runs whose
    # validation fold is also the fold they are scored on, as in cross-validation).
    select: str = "loss"
    # "youden", "calibrated", "sensitivity:0.95", or "auto": calibrated for the small-set
    # recipe (measured better there, README), youden for fine-tuning
    threshold: str = "auto"
    device: str = "auto"
    workers: int | None = None
    amp: bool = True
    resume: bool = False
    dropout: float = 0.3
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    max_minutes: float | None = None
    extra_train: tuple[str, ...] = ()  # datasets added to training only (never validated)
    recipe: str = "auto"  # "small-set", "finetune" or "auto" (see train.small_set)
    feature_cache: str | None = None  # small-set feature maps; None: ~/.cache/ichscan/features
    # small-set: a fifth reader on the head crop (--crop brain+head). None (the default):
    # with it when the data allows (a dataset folder, or a cache cut with its head plane);
    # True requires it, False leaves it out.
    head_reader: bool | None = None
    # finetune: the square prepare cuts from each slice (none, head, brain); the small-set
    # recipe cuts its own (brain) and refuses another
    crop: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def check(self) -> None:
        get_spec(self.architecture)
        for name, flag in (
            ("epochs", "--epochs"),
            ("batch_size", "--batch-size"),
            ("accumulate", "--accumulate"),
            ("size", "--size"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(
                    None, f"{flag} must be a whole number of 1 or more, not {value!r}"
                )
        if self.train_mode not in ("head", "all"):
            raise TrainingError(None, f"--train must be 'head' or 'all', not {self.train_mode!r}")
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise TrainingError(None, f"unknown --schedule {self.schedule!r}")
        if self.select not in SELECTIONS:
            raise TrainingError(
                None, f"--select must be one of {', '.join(SELECTIONS)}, not {self.select!r}"
            )
        if self.crop is not None and self.crop not in FINETUNE_CROPS:
            raise TrainingError(
                None, f"--crop must be one of {', '.join(FINETUNE_CROPS)}, not {self.crop!r}"
            )
        if not (self.threshold in THRESHOLD_METHODS or self.threshold.startswith("sensitivity:")):
            raise TrainingError(
                None,
                "--threshold must be 'auto', 'youden', 'calibrated' or 'sensitivity:0.95'",
            )
        if self.recipe not in RECIPES:
            raise TrainingError(None, f"--recipe must be one of {', '.join(RECIPES)}")
        if not 0 <= self.fold < self.folds:
            raise TrainingError(None, f"--fold {self.fold} is not in 0..{self.folds - 1}")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_weighted_log_loss: float
    val_mean_auc: float
    val_auc: dict[str, float]
    lr: float
    seconds: float


# What the ranks agree on after each epoch (rank 0 decides, see DistContext.agree).
STOP_GO, STOP_EARLY, STOP_CLOCK = 0, 1, 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(None, f"--device {name}: no CUDA device is available here")
    return torch.device(name)


def masked_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE with per-label weights (RSNA: any 2, subtypes 1); unknown labels (-1) ignored."""
    known = (target >= 0).to(logits.dtype)
    loss = nn.functional.binary_cross_entropy_with_logits(
        logits, target.clamp(min=0), reduction="none", pos_weight=pos_weight
    )
    w = weights * known
    return (loss * w).sum() / w.sum().clamp(min=1e-8)


def _param_groups(model: SliceModel, config: TrainConfig) -> list[dict[str, Any]]:
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": config.lr}]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_mult})
    return groups


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=max(0.05, min(0.5, warmup / total)),
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    dataset: SliceDataset,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    tta: bool = False,
) -> np.ndarray:
    """Probabilities [N, L] for every row of the dataset (augmentation off)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = []
    for x, _ in loader:
        x = x.to(device)
        logits = model(x)
        if tta:
            logits = (logits + model(torch.flip(x, dims=[3]))) / 2
        out.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(dataset.labels[0])))


def evaluate_rows(probs: np.ndarray, labels: np.ndarray, label_set: LabelSet) -> dict[str, Any]:
    aucs = {name: roc_auc(labels[:, j], probs[:, j]) for j, name in enumerate(label_set.labels)}
    finite = [v for v in aucs.values() if not math.isnan(v)]
    return {
        "weighted_log_loss": weighted_log_loss(labels, probs, label_set.weights),
        "auc": aucs,
        "mean_auc": float(np.mean(finite)) if finite else float("nan"),
    }


def resolve_threshold(method: str, recipe: str) -> str:
    """`--threshold auto`: calibrated for the small-set recipe, where it was measured as good
    as Youden or better on the real splits (README), Youden for fine-tuning, the field's
    usual choice."""
    if method != "auto":
        return method
    return "calibrated" if recipe == "small-set" else "youden"


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray, method: str) -> float:
    """One label's threshold: youden, calibrated, or sensitivity:TARGET."""
    bad = int((~np.isfinite(np.asarray(y_prob, dtype=np.float64))).sum())
    if bad:
        # The threshold rules refuse them too, as a ValueError: a user needs the cause.
        raise TrainingError(
            None,
            f"{bad} of {len(y_prob)} validation probabilities are NaN or infinite: the model "
            "diverged (try a lower --lr, or --no-amp)",
        )
    if method == "youden":
        return youden_threshold(y_true, y_prob)
    if method == "calibrated":
        return calibrated_threshold(y_true, y_prob)
    return threshold_for_sensitivity(y_true, y_prob, float(method.split(":", 1)[1]))


def choose_thresholds(
    probs: np.ndarray, labels: np.ndarray, label_set: LabelSet, method: str
) -> dict[str, float]:
    return {
        name: choose_threshold(labels[:, j], probs[:, j], method)
        for j, name in enumerate(label_set.labels)
    }


def choose_scan_thresholds(
    probs: np.ndarray, labels: np.ndarray, scan_ids: np.ndarray, label_set: LabelSet, method: str
) -> dict[str, float] | None:
    """Thresholds for the scan score (the max over a scan's slices), chosen by the same rule
    on the validation scans: a slice threshold applied to a maximum over dozens of slices
    calls far more scans positive than it was tuned to. None when every validation scan is
    one slice (the slice thresholds are then the scan thresholds)."""
    scans, index = np.unique(scan_ids, return_inverse=True)
    if len(scans) == len(scan_ids):
        return None
    scan_probs = np.full((len(scans), probs.shape[1]), -np.inf)
    np.maximum.at(scan_probs, index, probs)
    # Labelled as evaluate labels a scan: positive if any slice is.
    scan_labels = np.stack([scan_truth(labels[index == k]) for k in range(len(scans))])
    return choose_thresholds(scan_probs, scan_labels, label_set, method)


def _check_labels(
    labels: np.ndarray, rows: np.ndarray, label_set: LabelSet, what: str, why_empty: str
) -> None:
    if len(rows) == 0:
        raise TrainingError(None, f"the {what} split is empty: {why_empty}")
    sub = labels[rows]
    usable = [
        (sub[:, j] == 1).any() and (sub[:, j] == 0).any() for j in range(len(label_set.labels))
    ]
    if not any(usable):
        raise TrainingError(
            None,
            f"the {what} split has only one class for every label "
            f"({', '.join(label_set.labels)}): nothing to learn or measure",
        )


def checkpoint_bytes(model: nn.Module) -> int:
    """Peak bytes the checkpoints take: best.pt (the weights), last.pt (the weights and
    AdamW's two moments of every trained parameter) and, while last.pt is replaced, its
    temporary copy. The bundle's weights, written at the end, fit in what the temporary
    copy took."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    last = weights + moments
    # pickle's framing and the history: a few kB per tensor at most
    overhead = 4096 * len(model.state_dict()) + 1_000_000
    return weights + 2 * last + overhead


def _check_disk(out: Path, model: nn.Module, ckpt_dir: Path) -> None:
    need = checkpoint_bytes(model)
    # A resumed run (or a rerun into the same folder) replaces files already counted there.
    kept = (ckpt_dir / "best.pt", ckpt_dir / "last.pt")
    need -= sum(p.stat().st_size for p in kept if p.exists())
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(
            out, f"only {free / 1e6:.0f} MB free for checkpoints, need about {need / 1e6:.0f} MB"
        )


class CsvLog:
    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        if not (resume and path.exists()):
            path.write_text("")
            self._header = False
        else:
            self._header = True

    def write(self, record: EpochRecord) -> None:
        row = {k: v for k, v in asdict(record).items() if k != "val_auc"}
        row.update({f"val_auc_{k}": v for k, v in record.val_auc.items()})
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if not self._header:
                writer.writeheader()
                self._header = True
            writer.writerow(row)


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train one slice model; write the bundle to config.out; return the summary."""
    config.check()
    ctx = dist_utils.init_from_env()
    seed_everything(config.seed + ctx.rank)
    device = pick_device(config.device) if not ctx.distributed else ctx.device
    if ctx.distributed:
        _check_distributed(config)
    out = Path(config.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    # A resume that cannot go on (no checkpoint, other settings) says so before the data
    # are prepared again, which can take hours on a large set.
    resume_state = _load_checkpoint(ckpt_dir / "last.pt", config) if config.resume else None
    data = resolve_training_data(config, main=ctx.is_main)
    ctx.barrier()
    if data.recipe == "small-set":
        if ctx.distributed:
            raise TrainingError(None, SMALL_SET_NOT_TORCHRUN)
        from ichscan.train.small_set import train_small_set

        return train_small_set(config, data)
    cache, label_set, train_rows, val_rows = data.open()
    labels = cache.labels()
    _check_labels(
        labels, train_rows, label_set, "training", f"no usable slice outside fold {config.fold}"
    )
    _check_labels(
        labels,
        val_rows,
        label_set,
        "validation",
        f"fold {config.fold} of {config.folds} holds no usable slice (all unreadable or held out)",
    )

    model = SliceModel(
        config.architecture,
        len(label_set.labels),
        pretrained=config.pretrained,
        dropout=config.dropout,
    )
    model.freeze_backbone(config.train_mode == "head")
    model.to(device)
    # Only rank 0 writes, so it alone checks the disk; the others leave with it instead of
    # waiting for it in DDP's first broadcast.
    disk_error: TrainingError | None = None
    if ctx.is_main:
        try:
            _check_disk(out, model, ckpt_dir)
        except TrainingError as exc:
            disk_error = exc
    if ctx.agree(int(disk_error is not None)):
        raise disk_error or TrainingError(out, "rank 0 found too little space for checkpoints")
    train_model: nn.Module = ctx.wrap(model)

    augment = build_augment(config.augment, cache.size)
    train_set = SliceDataset(cache, train_rows, input_kind=config.input_kind, augment=augment)
    val_set = SliceDataset(cache, val_rows, input_kind=config.input_kind)
    val_share = _rank_share(val_set, ctx)
    workers = config.workers if config.workers is not None else dist_utils.default_workers(ctx)
    sampler = ctx.sampler(train_set, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=len(train_set) > config.batch_size,
        generator=generator,
        # Workers started afresh each epoch take their seeds from the generator, whose state
        # the checkpoint keeps: a resumed run's augmentations are the uninterrupted run's.
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.AdamW(_param_groups(model, config), weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(loader) / config.accumulate))
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    weights = torch.tensor(label_set.weights, dtype=torch.float32, device=device)
    pos_weight = None
    if config.pos_weight:
        sub = labels[train_rows]
        pos = (sub == 1).sum(0).clip(min=1)
        neg = (sub == 0).sum(0)
        pos_weight = torch.tensor(neg / pos, dtype=torch.float32, device=device)

    history: list[EpochRecord] = []
    start_epoch, best, best_epoch, stale = 0, math.inf, -1, 0
    if resume_state is not None:
        state = resume_state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch, stale = (
            state["epoch"] + 1,
            state["best"],
            state["best_epoch"],
            state["stale"],
        )
        history = [EpochRecord(**r) for r in state["history"]]
        _restore_rng(state, generator, ctx, config.seed + start_epoch, device)
    if ctx.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            # An earlier run's best.pt would otherwise become this run's model whenever no
            # epoch of this one improves on the start (--select auc with undefined AUCs).
            for stale_file in (ckpt_dir / "best.pt", ckpt_dir / "last.pt"):
                stale_file.unlink(missing_ok=True)
    log = CsvLog(out / "train_log.csv", config.resume) if ctx.is_main else None
    tb = _tensorboard(out, config.tensorboard) if ctx.is_main else None
    started = time.monotonic()
    val_labels = labels[val_rows]
    val_probs = np.zeros((len(val_rows), len(label_set.labels)))

    for epoch in range(start_epoch, config.epochs):
        t0 = time.monotonic()
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loss = _train_epoch(
            train_model,
            loader,
            optimizer,
            scheduler,
            scaler,
            weights,
            pos_weight,
            config,
            device,
            use_amp,
            epoch,
            ctx.is_main,
        )
        ctx.sync_buffers(model)
        val_probs = _predict_shared(model, val_share, config.batch_size * 2, device, ctx)
        metrics = evaluate_rows(val_probs, val_labels, label_set)
        val_loss = metrics["weighted_log_loss"]
        record = EpochRecord(
            epoch,
            train_loss,
            val_loss,
            metrics["weighted_log_loss"],
            metrics["mean_auc"],
            metrics["auc"],
            optimizer.param_groups[0]["lr"],
            time.monotonic() - t0,
        )
        history.append(record)
        score = -metrics["mean_auc"] if config.select == "auc" else val_loss
        improved = config.select == "last" or score < best - 1e-6
        if improved:
            best, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
        # Every rank's random state, so a resumed rank draws what it would have drawn.
        rng = ctx.gather(_rng_state(generator, device))
        if ctx.is_main:
            assert log is not None
            log.write(record)
            if tb is not None:
                tb.add_scalar("loss/train", train_loss, epoch)
                tb.add_scalar("loss/val", val_loss, epoch)
                tb.add_scalar("auc/val_mean", metrics["mean_auc"], epoch)
            if improved:
                _save_weights(model, ckpt_dir / "best.pt")
            _save_checkpoint(
                ckpt_dir / "last.pt",
                model,
                optimizer,
                scheduler,
                scaler,
                epoch,
                best,
                best_epoch,
                stale,
                history,
                config,
                rng,
            )
            if config.progress:
                print(
                    f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f}  "
                    f"val loss {val_loss:.4f}  val AUC {metrics['mean_auc']:.3f}"
                    f"{'  *' if improved else ''}  ({record.seconds:.0f} s)",
                    flush=True,
                )
        ctx.barrier()
        stop = STOP_GO
        if stale >= config.patience:
            stop = STOP_EARLY
        elif config.max_minutes and (time.monotonic() - started) / 60 > config.max_minutes:
            stop = STOP_CLOCK
        # Rank 0's clock decides for all: a rank leaving the loop alone would leave the
        # others waiting in the next step's all-reduce for ever.
        stop = ctx.agree(stop)
        if stop != STOP_GO:
            if ctx.is_main and config.progress:
                print(
                    f"early stop: no improvement for {config.patience} epochs"
                    if stop == STOP_EARLY
                    else f"stopping: --max-minutes {config.max_minutes} reached",
                    flush=True,
                )
            break

    # Every rank fingerprints the weights it ended with: under DDP they must be identical.
    fingerprint = weights_fingerprint(model)
    summary: dict[str, Any] = {}
    if ctx.is_main:
        if (ckpt_dir / "best.pt").exists():
            model.load_state_dict(
                torch.load(ckpt_dir / "best.pt", map_location=device, weights_only=True)
            )
        val_probs = predict_rows(model, val_set, device, config.batch_size * 2)
        final = evaluate_rows(val_probs, val_labels, label_set)
        rule = resolve_threshold(config.threshold, "finetune")
        thresholds = choose_thresholds(val_probs, val_labels, label_set, rule)
        scan_thresholds = choose_scan_thresholds(
            val_probs, val_labels, cache.index["scan_id"].to_numpy()[val_rows], label_set, rule
        )
        summary = _write_bundle(
            out,
            model,
            config,
            data,
            label_set,
            thresholds,
            final,
            history,
            best_epoch,
            time.monotonic() - started,
            cache,
            scan_thresholds,
            ctx.world_size,
        )
        _plot_curves(history, out / "training_curves.png")
        if tb is not None:
            tb.close()
    ctx.barrier()
    ctx.shutdown()
    return {**summary, "rank": ctx.rank, "final_weights_sha256": fingerprint}


SMALL_SET_NOT_TORCHRUN = (
    "the small-set recipe runs in one process, not under torchrun: run it without "
    "torchrun, or fine-tune with --recipe finetune"
)


def _check_distributed(config: TrainConfig) -> None:
    """What torchrun cannot run, refused on every rank before any work. Preparing raw data
    on rank 0 would leave the other ranks in a collective that times out (NCCL 10 min,
    gloo 30 min) long before a large set is prepared; a longer timeout would also hide
    real hangs, so the cache is prepared first, by one process."""
    data = Path(config.data)
    if config.recipe == "small-set":
        raise TrainingError(None, SMALL_SET_NOT_TORCHRUN)
    if data.exists() and not PreparedCache.is_cache(data):
        raise TrainingError(
            data,
            "under torchrun, training reads a prepared cache; prepare the cache first: "
            f"ichscan prepare {data} --out CACHE, then torchrun ... train CACHE",
        )


def _rank_share(dataset: SliceDataset, ctx: dist_utils.DistContext) -> SliceDataset:
    """This rank's contiguous share of the rows (all of them without torchrun): each rank
    validates its share, so validation takes 1/N of the time instead of N copies of it."""
    if not ctx.distributed:
        return dataset
    share = np.array_split(dataset.rows, ctx.world_size)[ctx.rank]
    return SliceDataset(dataset.cache, share, input_kind=dataset.input_kind)


def _predict_shared(
    model: nn.Module,
    share: SliceDataset,
    batch_size: int,
    device: torch.device,
    ctx: dist_utils.DistContext,
) -> np.ndarray:
    """Probabilities of every rank's share (`_rank_share`), on every rank, in row order."""
    part = predict_rows(model, share, device, batch_size)
    return np.concatenate(ctx.gather(part)) if ctx.distributed else part


def weights_fingerprint(model: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    weights: torch.Tensor,
    pos_weight: torch.Tensor | None,
    config: TrainConfig,
    device: torch.device,
    use_amp: bool,
    epoch: int,
    show: bool,
) -> float:
    from ichscan.progress import progress_bar

    model.train()
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(
        loader, desc=f"epoch {epoch + 1}", leave=False, disable=not (show and config.progress)
    )
    batches = len(loader)
    # The last group of an epoch may hold fewer batches: its mean is over what it holds.
    full_groups = batches - batches % config.accumulate
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=use_amp):
            loss = masked_bce(model(x), y, weights, pos_weight)
        group = config.accumulate if step < full_groups else batches - full_groups
        scaler.scale(loss / group).backward()
        if (step + 1) % config.accumulate == 0 or step + 1 == len(loader):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random source a training epoch draws from: the loader's shuffle, augmentation
    and dropout (torch), numpy and Python's random."""
    state = {
        "loader": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(
    state: dict[str, Any],
    generator: torch.Generator,
    ctx: dist_utils.DistContext,
    reseed: int,
    device: torch.device,
) -> None:
    ranks = state.get("rng")
    if ranks is None:  # checkpoints before the loader's state was kept
        torch.set_rng_state(state["rng_torch"])
        np.random.set_state(state["rng_numpy"])
        return
    if len(ranks) != ctx.world_size:
        # Another number of processes splits the data differently anyway: a fresh seed per
        # rank keeps their augmentations apart.
        seed_everything(reseed + ctx.rank)
        generator.manual_seed(reseed)
        return
    mine = ranks[ctx.rank]
    generator.set_state(mine["loader"])
    torch.set_rng_state(mine["torch"])
    np.random.set_state(mine["numpy"])
    random.setstate(mine["python"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)


def _save_weights(model: SliceModel, path: Path) -> None:
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def _save_checkpoint(
    path: Path,
    model: SliceModel,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    best: float,
    best_epoch: int,
    stale: int,
    history: list[EpochRecord],
    config: TrainConfig,
    rng: list[dict[str, Any]],
) -> None:
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best": best,
        "best_epoch": best_epoch,
        "stale": stale,
        "history": [asdict(r) for r in history],
        "rng": rng,
        "config": _config_json(config),
        "settings": _resume_settings(_config_json(config)),
    }
    atomic_torch_save(state, path)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    if not path.exists():
        raise TrainingError(path, "--resume: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainingError(
            path, f"--resume: the checkpoint cannot be read ({_first_line(exc)})"
        ) from None
    # Checkpoints before the settings were recorded: compare what their config holds.
    saved = state.get("settings") or _resume_settings(state.get("config", {}))
    now = _resume_settings(_config_json(config))
    differ = [key for key in now if key in saved and saved[key] != now[key]]
    if differ:
        parts = [
            f"{RESUME_FLAGS.get(k, k)} {_shown_setting(saved[k])} in the checkpoint, "
            f"{_shown_setting(now[k])} now"
            for k in differ
        ]
        raise TrainingError(
            path,
            f"--resume with different settings ({'; '.join(parts)}): resume with the "
            "checkpoint's settings, or train into another --out",
        )
    old_epochs = state.get("config", {}).get("epochs", config.epochs)
    if config.schedule == "onecycle" and old_epochs != config.epochs:
        # One-cycle's state holds its total step count: another --epochs cannot continue it.
        raise TrainingError(
            path,
            f"--resume with --schedule onecycle and another --epochs ({old_epochs} in the "
            f"checkpoint, {config.epochs} now): the one-cycle schedule cannot be stretched",
        )
    return state


# What --resume may change: where and how fast it runs, how long (--epochs stretches the
# cosine or constant schedule from where it is), when it gives up, and how the threshold is
# chosen at the end. Every other setting changes what is trained or what the bundle records.
RESUME_FREE = frozenset(
    {
        "out",
        "resume",
        "device",
        "workers",
        "amp",
        "progress",
        "tensorboard",
        "max_minutes",
        "patience",
        "threshold",
        "epochs",
        "feature_cache",
    }
)

RESUME_FLAGS = {
    "data": "DATA",
    "pretrained": "--pretrained",
    "labels": "--labels",
    "fold": "--fold",
    "folds": "--folds",
    "seed": "--seed",
    "crop": "--crop",
    "extra_train": "--extra-train",
    "recipe": "--recipe",
    "head_reader": "--head-reader",
    **FINETUNE_ONLY,
}


def _resume_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, from a config's JSON;
    paths absolute, so the same data named from another folder is the same data."""
    settings = {k: v for k, v in config.items() if k not in RESUME_FREE}
    if settings.get("data"):
        settings["data"] = str(Path(settings["data"]).resolve())
    if settings.get("extra_train"):
        settings["extra_train"] = [str(Path(e).resolve()) for e in settings["extra_train"]]
    return settings


def _shown_setting(value: Any) -> str:
    if isinstance(value, dict):  # the augmentation
        if value == _config_json_value(AugmentSpec()):
            return "on"
        if value == _config_json_value(AugmentSpec.off()):
            return "off (--no-augment)"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return "unset" if value is None else str(value)


def _config_json_value(value: Any) -> Any:
    return json.loads(json.dumps(asdict(value), default=str))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _config_json(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["windows"] = list(config.windows)
    return json.loads(json.dumps(d, default=str))


def _write_bundle(
    out: Path,
    model: SliceModel,
    config: TrainConfig,
    data,
    label_set,
    thresholds: dict[str, float],
    final: dict[str, Any],
    history: list[EpochRecord],
    best_epoch: int,
    seconds: float,
    cache: PreparedCache,
    scan_thresholds: dict[str, float] | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    spec = input_spec(
        cache.facts["windows"],
        cache.size,
        kind=config.input_kind,
        mode=cache.facts.get("mode", "linear"),
        source_window=data.source_window,
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
        crop=cache.crop,  # a cache prepared with --crop: predict must cut the same square
        crop_version=cache.crop_version,
        slice_thickness_mm=cache.slice_spacing_mm,
    )
    bundle = new_config(
        architecture=config.architecture,
        weights_provenance=model.provenance,
        label_set=label_set,
        input_spec=spec,
        dropout=config.dropout,
        training={
            "data": str(config.data),
            "data_summary": data.summary,
            "fold": config.fold,
            "folds": config.folds,
            "epochs_run": len(history),
            "best_epoch": best_epoch + 1,
            "seconds": round(seconds, 1),
            # Under torchrun each of the processes takes --batch-size per step, so the
            # steps per epoch and the batch the optimiser sees are not the config's alone.
            "processes": processes,
            "effective_batch_size": config.batch_size * config.accumulate * processes,
            "config": _config_json(config),
        },
        metrics={"validation": final, "validation_slices": len(data.val_rows)},
    )
    bundle["thresholds"] = thresholds
    method = resolve_threshold(config.threshold, "finetune")
    bundle["threshold_method"] = f"{method} on the validation fold"
    if scan_thresholds is not None:
        bundle["scan_thresholds"] = scan_thresholds
        bundle["scan_threshold_method"] = (
            f"{method} on the validation fold's scans (each the max over its slices)"
        )
    save_bundle(out, bundle, [model])
    return bundle


def _plot_curves(history: list[EpochRecord], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch + 1 for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r.train_loss for r in history], label="train loss")
    a.plot(epochs, [r.val_loss for r in history], label="validation weighted log loss")
    a.set_xlabel("epoch")
    a.legend()
    b.plot(epochs, [r.val_mean_auc for r in history], label="validation mean AUC")
    b.set_xlabel("epoch")
    b.set_ylim(0.4, 1.0)
    b.legend()
    fig.suptitle("ichscan training (research software, not a medical device)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_from_kwargs(**kwargs: Any) -> TrainConfig:
    return replace(TrainConfig(data="", out=""), **kwargs)


__all__ = ["TrainConfig", "TrainingError", "config_from_kwargs", "get_label_set", "train"]
