"""`ichscan train-study`: fit the study-level sequence model on the frozen slice model's
embeddings of every scan, and add it to the bundle.

Embeddings are computed once (no augmentation) into a float16 file beside the bundle, read
through a memory map and removed at the end. The RSNA training set's 750,000 slices give
2-3 GB of embeddings; mapped, they are file pages the kernel can drop and re-read, not
memory the process must hold, so a large dataset does not need that much free RAM. The
sequence model then trains in seconds per epoch. Slice labels supervise the per-slice
outputs where the dataset has them (RSNA); scan labels (any slice positive, or CQ500's
scan-level reads) supervise the scan output.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ichscan.data.cache import PreparedCache
from ichscan.errors import IchscanError
from ichscan.evaluate.metrics import roc_auc, weighted_log_loss
from ichscan.models.bundle import Bundle, load_bundle, save_bundle
from ichscan.models.study import StudyModel
from ichscan.train.dataset import SliceDataset
from ichscan.train.loop import choose_threshold, masked_bce, pick_device, seed_everything

EMBEDDING_DTYPE = np.float16  # what embed_cache stores, and what the disk check counts
MIN_MEDIAN_SLICES = 2  # scans shorter than this (the median) are slices, not sequences


class StudyTrainingError(IchscanError):
    pass


@dataclass
class StudyConfig:
    model: str
    data: str | None = None  # a prepared cache; default: the cache the slice model used
    kind: str = "gru"
    hidden: int = 128
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@torch.no_grad()
def embed_cache(
    bundle: Bundle,
    cache: PreparedCache,
    device: torch.device,
    batch_size: int = 64,
    path: Path | None = None,
) -> np.ndarray:
    """float16 [N, D] embeddings of every cache row by the bundle's first slice model; in
    memory, or written to the .npy file ``path`` and returned as its read-only memory map."""
    model = bundle.members[0].to(device).eval()
    dataset = SliceDataset(cache, np.arange(len(cache)), input_kind=bundle.input["kind"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    shape = (len(cache), model.embed_dim)
    out = (
        np.empty(shape, dtype=EMBEDDING_DTYPE)
        if path is None
        else np.lib.format.open_memmap(path, mode="w+", dtype=EMBEDDING_DTYPE, shape=shape)
    )
    i = 0
    for x, _ in loader:
        e = model.embed(x.to(device)).float().cpu().numpy()
        out[i : i + len(e)] = e
        i += len(e)
    if path is None:
        return out
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def scan_groups(cache: PreparedCache) -> list[np.ndarray]:
    """Row indices of each scan, ordered by slice_index."""
    index = cache.index
    order = np.lexsort((index["slice_index"].to_numpy(), index["scan_id"].to_numpy()))
    scans = index["scan_id"].to_numpy()[order]
    cuts = np.flatnonzero(scans[1:] != scans[:-1]) + 1
    return np.split(order, cuts)


def _batch(
    groups: list[np.ndarray], emb: np.ndarray, labels: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(g) for g in groups)
    b, d, n_labels = len(groups), emb.shape[1], labels.shape[1]
    x = torch.zeros(b, longest, d)
    y = torch.full((b, longest, n_labels), -1.0)
    mask = torch.zeros(b, longest, dtype=torch.bool)
    for i, g in enumerate(groups):
        x[i, : len(g)] = torch.from_numpy(emb[g].astype(np.float32))
        y[i, : len(g)] = torch.from_numpy(labels[g].astype(np.float32))
        mask[i, : len(g)] = True
    known = (y >= 0) & mask.unsqueeze(-1)
    # A scan is positive when any slice is, negative when a slice says so and none is positive.
    scan_y = torch.where((y == 1).any(1), 1.0, torch.where(known.any(1), 0.0, -1.0))
    return x, y, mask, scan_y


def train_study(config: StudyConfig) -> dict[str, Any]:
    for name in ("epochs", "hidden", "batch_size"):
        if getattr(config, name) < 1:
            raise StudyTrainingError(
                None, f"--{name.replace('_', '-')} must be 1 or more, not {getattr(config, name)}"
            )
    seed_everything(config.seed)
    device = pick_device(config.device)
    bundle = load_bundle(config.model, device)
    cache_root = Path(config.data) if config.data else Path(config.model) / "cache"
    if not PreparedCache.is_cache(cache_root):
        raise StudyTrainingError(
            cache_root,
            "no prepared cache here: pass the cache the slice "
            "model was trained on (ichscan prepare DATA --out CACHE)",
        )
    cache = PreparedCache(cache_root)
    if list(cache.label_names) != bundle.labels and bundle.config["label_set"] != "binary":
        raise StudyTrainingError(
            cache_root, f"cache labels {cache.label_names} do not match the model's {bundle.labels}"
        )
    labels = _labels_for(bundle, cache)
    # CQ500 reads are per scan: copying them onto every slice would teach the slice outputs
    # that every slice of a bleeding scan bleeds.
    slice_level = cache.facts.get("manifest", {}).get("label_level", "slice") != "scan"
    started = time.monotonic()
    row_bytes = bundle.members[0].embed_dim * np.dtype(EMBEDDING_DTYPE).itemsize
    _check_disk(Path(config.model), len(cache) * row_bytes)
    with tempfile.TemporaryDirectory(dir=config.model, prefix=".study-embeddings-") as tmp:
        emb = embed_cache(bundle, cache, device, path=Path(tmp) / "embeddings.npy")
        model, study_config = _fit_study(config, bundle, cache, emb, labels, slice_level, device)
        del emb  # the memory map, before its file goes
    study_config["seconds"] = round(time.monotonic() - started, 1)
    save_bundle(config.model, bundle.config, bundle.members, model.cpu(), study_config)
    return study_config


def _check_disk(folder: Path, embedding_bytes: int) -> None:
    need = embedding_bytes + 50_000_000  # and the bundle saved again
    free = shutil.disk_usage(folder).free
    if free < need:
        raise StudyTrainingError(
            folder,
            f"only {free / 1e6:.0f} MB free, the slice embeddings need about "
            f"{need / 1e6:.0f} MB here while the study model trains",
        )


def _fit_study(
    config: StudyConfig,
    bundle: Bundle,
    cache: PreparedCache,
    emb: np.ndarray,
    labels: np.ndarray,
    slice_level: bool,
    device: torch.device,
) -> tuple[StudyModel, dict[str, Any]]:
    cache_root = cache.root
    groups = [g[cache.ok[g]] for g in scan_groups(cache) if cache.ok[g].any()]
    fold = int(bundle.config.get("training", {}).get("fold", 0))
    folds = cache.index["fold"].to_numpy()
    val_groups = [g for g in groups if folds[g[0]] == fold]
    train_groups = [g for g in groups if folds[g[0]] != fold and folds[g[0]] >= 0]
    if not train_groups or not val_groups:
        raise StudyTrainingError(
            cache_root, f"need scans in both the training folds and the validation fold {fold}"
        )
    lengths = np.array([len(g) for g in groups])
    if np.median(lengths) < MIN_MEDIAN_SLICES:
        # A sequence model over one-slice "scans" (a folder of PNG slices) learns nothing a
        # slice model does not, and its outputs would silently replace the slice model's.
        raise StudyTrainingError(
            cache_root,
            f"{int((lengths < 2).sum())} of {len(groups)} scans are a single slice: the study "
            "model reads scans of several slices (RSNA studies, CQ500 series, NIfTI volumes)",
        )
    weights = torch.tensor(bundle.label_set.weights, device=device)
    model = StudyModel(emb.shape[1], labels.shape[1], kind=config.kind, hidden=config.hidden).to(
        device
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    # The number of batches depends on the lengths only, not on the shuffle.
    per_epoch = len(length_batches(train_groups, config.batch_size, np.random.default_rng(0)))
    steps = config.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=max(1, steps))
    best, best_state, history = math.inf, None, []
    for epoch in range(config.epochs):
        model.train()
        for which in length_batches(train_groups, config.batch_size, rng):
            chunk = [train_groups[i] for i in which]
            x, y, mask, scan_y = (t.to(device) for t in _batch(chunk, emb, labels))
            slice_logits, scan_logits = model(x, mask)
            loss = masked_bce(scan_logits, scan_y, weights)
            if slice_level:
                loss = loss + masked_bce(slice_logits[mask], y[mask], weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        metrics = evaluate_study(model, val_groups, emb, labels, bundle, device)
        history.append({"epoch": epoch, **metrics})
        score = metrics["scan_weighted_log_loss"] + metrics["slice_weighted_log_loss"]
        if score < best:
            best, best_state = (
                score,
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
        if config.progress:
            print(
                f"study epoch {epoch + 1}/{config.epochs}  slice AUC "
                f"{metrics['slice_mean_auc']:.3f}  scan AUC {metrics['scan_mean_auc']:.3f}",
                flush=True,
            )
    assert best_state is not None
    model.load_state_dict(best_state)
    outputs = _outputs(model, val_groups, emb, labels, device)
    final = study_metrics(outputs, bundle)
    thresholds, method = study_thresholds(outputs, bundle, slice_level)
    study_config = {
        "kind": config.kind,
        "hidden": config.hidden,
        "epochs": config.epochs,
        "validation": final,
        "thresholds": thresholds,
        "threshold_method": method,
        "validation_scans": len(val_groups),
        "train_scans": len(train_groups),
        "note": "trained on the frozen slice model's embeddings of the same training folds",
    }
    return model, study_config


def length_batches(
    groups: list[np.ndarray], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Indices of ``groups`` in shuffled batches, each of scans of one length. The sequence
    model reads padding as slices (its backward GRU starts on it), and predict runs each
    scan alone: unpadded batches train it on what it will see."""
    lengths = np.array([len(g) for g in groups])
    order = rng.permutation(len(groups))
    batches = []
    for length in np.unique(lengths):
        same = order[lengths[order] == length]
        batches += [same[i : i + batch_size] for i in range(0, len(same), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _labels_for(bundle: Bundle, cache: PreparedCache) -> np.ndarray:
    labels = cache.labels()
    if bundle.config["label_set"] == "binary" and "hemorrhage" not in cache.label_names:
        source = "any" if "any" in cache.label_names else "ich"
        labels = labels[:, [list(cache.label_names).index(source)]]
    return labels


@torch.no_grad()
def _outputs(
    model: StudyModel,
    groups: list[np.ndarray],
    emb: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(slice probs, slice labels, scan probs, scan labels) of these scans, in their order;
    -1 is unknown. Each batch holds scans of one length, unpadded: the sequence model reads
    padding as slices, and predict runs one scan alone, so the validation outputs (and the
    thresholds chosen on them) are what predict computes."""
    model.eval()
    per_scan: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]
    per_scan = [None] * len(groups)
    lengths = np.array([len(g) for g in groups])
    for length in np.unique(lengths):
        same = np.flatnonzero(lengths == length)
        for start in range(0, len(same), 32):
            which = same[start : start + 32]
            x, y, _, sy = _batch([groups[i] for i in which], emb, labels)
            sl, sc = model(x.to(device))
            sl, sc = torch.sigmoid(sl).cpu().numpy(), torch.sigmoid(sc).cpu().numpy()
            for k, i in enumerate(which):
                per_scan[i] = (sl[k], y[k].numpy(), sc[k : k + 1], sy[k : k + 1].numpy())
    sp, sy, cp, cy = (np.concatenate([s[j] for s in per_scan if s is not None]) for j in range(4))
    return sp, sy, cp, cy


def study_thresholds(
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    bundle: Bundle,
    slice_level: bool,
) -> tuple[dict[str, float], str]:
    """Decision thresholds for the study model's own outputs, chosen on the validation scans
    the way the slice model's were: its probabilities replace the slice model's at predict
    time, so the slice model's thresholds do not fit them. Chosen on slice outputs where the
    labels are per slice, on scan outputs otherwise; a label with one class there keeps the
    slice model's threshold. ``outputs``: :func:`_outputs` of the validation scans."""
    sp, sy, cp, cy = outputs
    probs, truth = (sp, sy) if slice_level else (cp, cy)
    recorded = str(bundle.config.get("threshold_method", "youden")).split(" ")[0]
    method = recorded if recorded in ("youden", "calibrated") or ":" in recorded else "youden"
    out = dict(bundle.thresholds)
    for j, name in enumerate(bundle.labels):
        known = truth[:, j] >= 0
        y = truth[known, j]
        if (y == 1).any() and (y == 0).any():
            out[name] = choose_threshold(y, probs[known, j], method)
    where = "slices" if slice_level else "scans"
    return out, f"{method} on the study model's validation {where}"


def evaluate_study(
    model: StudyModel,
    groups: list[np.ndarray],
    emb: np.ndarray,
    labels: np.ndarray,
    bundle: Bundle,
    device: torch.device,
) -> dict[str, float]:
    return study_metrics(_outputs(model, groups, emb, labels, device), bundle)


def study_metrics(
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], bundle: Bundle
) -> dict[str, float]:
    """Weighted log loss and mean AUC at slice and scan level, of :func:`_outputs`."""
    sp, sy_, cp, cy = outputs
    w = bundle.label_set.weights

    def mean_auc(y: np.ndarray, p: np.ndarray) -> float:
        values = [roc_auc(y[:, j], p[:, j]) for j in range(y.shape[1])]
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else float("nan")

    return {
        "slice_weighted_log_loss": weighted_log_loss(sy_, sp, w),
        "slice_mean_auc": mean_auc(sy_, sp),
        "scan_weighted_log_loss": weighted_log_loss(cy, cp, w),
        "scan_mean_auc": mean_auc(cy, cp),
    }


__all__ = ["StudyConfig", "StudyTrainingError", "train_study"]
