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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ichscan.data.cache import PreparedCache
from ichscan.data.input_check import input_differences
from ichscan.errors import IchscanError
from ichscan.evaluate.metrics import roc_auc, weighted_log_loss
from ichscan.infer.inputs import InputSpec
from ichscan.models.bundle import Bundle, load_bundle, save_bundle
from ichscan.models.study import StudyModel
from ichscan.progress import progress_bar
from ichscan.train.data import EXTRA_FOLD, split_rows
from ichscan.train.dataset import SliceDataset
from ichscan.train.loop import choose_threshold, masked_bce, pick_device, seed_everything

EMBEDDING_DTYPE = np.float16  # what embed_cache stores, and what the disk check counts
SCAN_OUTPUT = "on the study model's validation scans (its scan output)"  # scan_threshold_method
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
    progress: bool = False,
) -> np.ndarray:
    """float16 [N, D] embeddings of every cache row by the bundle's first slice model; in
    memory, or written to the .npy file ``path`` and returned as its read-only memory map.
    ``progress``: a bar on stderr (the RSNA set takes hours on a CPU)."""
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
    bar = progress_bar(
        loader, desc="embedding slices", unit="batch", disable=not progress, file=sys.stderr
    )
    for x, _ in bar:
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
    cache_root = _cache_root(config, bundle)
    cache = PreparedCache(cache_root)
    if list(cache.label_names) != bundle.labels and bundle.config["label_set"] != "binary":
        raise StudyTrainingError(
            cache_root, f"cache labels {cache.label_names} do not match the model's {bundle.labels}"
        )
    _check_input(bundle, cache)
    _check_held_out(config, bundle, cache)
    labels = _labels_for(bundle, cache)
    # CQ500 reads are per scan: copying them onto every slice would teach the slice outputs
    # that every slice of a bleeding scan bleeds.
    slice_level = cache.label_level != "scan"
    started = time.monotonic()
    row_bytes = bundle.members[0].embed_dim * np.dtype(EMBEDDING_DTYPE).itemsize
    _check_disk(Path(config.model), len(cache) * row_bytes)
    # These read the index only: a set they refuse is refused in seconds, not after an
    # embedding pass that takes hours on a large set.
    train_groups, val_groups = _split_scans(cache, _validation_fold(bundle))
    with tempfile.TemporaryDirectory(dir=config.model, prefix=".study-embeddings-") as tmp:
        emb = embed_cache(
            bundle, cache, device, path=Path(tmp) / "embeddings.npy", progress=config.progress
        )
        model, study_config = _fit_study(
            config, bundle, (train_groups, val_groups), emb, labels, slice_level, device
        )
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


def _cache_root(config: StudyConfig, bundle: Bundle) -> Path:
    """--data; else the prepared cache the slice model was trained on (see
    :func:`_trained_cache`)."""
    if config.data:
        root = Path(config.data)
        if not PreparedCache.is_cache(root):
            raise StudyTrainingError(
                root,
                "no prepared cache here: pass the cache the slice "
                "model was trained on (ichscan prepare DATA --out CACHE)",
            )
        return root
    training = bundle.config.get("training") or {}
    trained = _trained_cache(Path(config.model), training)
    if trained is not None:
        return trained
    recorded = training.get("data")
    elsewhere = f", nor is {recorded} (what it was trained on) one" if recorded else ""
    raise StudyTrainingError(
        Path(config.model) / "cache",
        f"no prepared cache here{elsewhere}: pass the cache the slice model was trained on "
        "with --data (ichscan prepare DATA --out CACHE)",
    )


def _trained_cache(model_dir: Path, training: dict[str, Any]) -> Path | None:
    """The prepared cache the slice model was trained on, where it still exists: the model's
    own (a model trained on raw data prepared it there), else the one the bundle records it
    was trained on, which `ichscan train CACHE` leaves where it was."""
    own = model_dir / "cache"
    if PreparedCache.is_cache(own):
        return own
    recorded = training.get("data")
    return Path(recorded) if recorded and PreparedCache.is_cache(recorded) else None


def _check_input(bundle: Bundle, cache: PreparedCache) -> None:
    """Refuse a cache cut otherwise than the slices predict gives the slice model: the study
    model and its thresholds would be fitted to embeddings of inputs it never sees."""
    differ = input_differences(cache, InputSpec.from_bundle(bundle.input))
    if differ:
        raise StudyTrainingError(
            cache.root,
            f"this cache's input differs from the model's: {'; '.join(map(str, differ))}; "
            "pass the cache the slice model was trained on, or prepare one as it was",
        )


def _check_held_out(config: StudyConfig, bundle: Bundle, cache: PreparedCache) -> None:
    """Refuse a cache whose validation fold is not the scans the slice model held out: on
    scans the slice model trained on, the study model's validation (its AUC, and the
    thresholds chosen there) would be optimistic. Exact, by scan and patient, against the
    slice model's own cache when that is another folder that still exists; otherwise the
    split's fold count and slice counts must be what the bundle records (a one-line note
    says that this is all that was checked, where the slice model's cache is gone)."""
    training = bundle.config.get("training") or {}
    if "fold" not in training or "folds" not in training:
        print(
            f"note: {bundle.root}: the bundle does not record the slice model's split, so "
            f"whether {cache.root}'s validation fold was held out from it is not checked",
            file=sys.stderr,
        )
        return
    fold, folds = int(training["fold"]), int(training["folds"])
    cache_folds = cache.index["fold"].to_numpy()
    split = int(cache_folds.max()) + 1
    retrain = "pass the cache the slice model was trained on"
    if split != folds:
        raise StudyTrainingError(
            cache.root,
            f"this cache is split into {split} folds, the slice model's data into {folds}: its "
            f"fold {fold} is not the scans the slice model held out; {retrain}",
        )
    slice_cache = _trained_cache(Path(config.model), training)
    if slice_cache is not None and slice_cache.resolve() != cache.root.resolve():
        other = PreparedCache(slice_cache)
        seen = _rows(other, fold, validation=False)
        held = _rows(cache, fold, validation=True)
        leaked = 0
        for column in ("scan_id", "patient_id"):
            known = set(other.index[column].to_numpy()[seen].astype(str)) - {""}
            ours = cache.index[column].to_numpy()[held].astype(str)
            leaked = max(leaked, len(set(ours) & known))
        if leaked:
            raise StudyTrainingError(
                cache.root,
                f"{leaked} scan(s) or patient(s) of validation fold {fold} here are in the "
                f"slice model's training folds (in {slice_cache}): the study model's validation "
                f"would not be held out; {retrain}",
            )
        return
    summary = training.get("data_summary") or {}
    recorded = (summary.get("train_slices"), summary.get("validation_slices"))
    if None in recorded:
        print(
            f"note: {bundle.root}: the bundle does not record its split's slice counts, so "
            f"whether {cache.root}'s fold {fold} was held out from the slice model is not "
            "checked",
            file=sys.stderr,
        )
        return
    here = (
        int(_rows(cache, fold, validation=False).sum()),
        int(_rows(cache, fold, validation=True).sum()),
    )
    if here != tuple(int(n) for n in recorded):
        seed = (training.get("config") or {}).get("seed")
        how = f" (--folds {folds} --seed {seed})" if seed is not None else ""
        raise StudyTrainingError(
            cache.root,
            f"this cache splits {here[0]} training and {here[1]} validation slices (fold "
            f"{fold}), the slice model {recorded[0]} and {recorded[1]}: another split, so the "
            f"study model's validation scans may be ones the slice model trained on; {retrain}"
            f", or one split as it was{how}",
        )
    if slice_cache is None:
        print(
            f"note: the slice model's cache ({training.get('data')}) is not there to compare "
            f"scans with: {cache.root}'s split is checked by its fold and slice counts only",
            file=sys.stderr,
        )


def _rows(cache: PreparedCache, fold: int, validation: bool) -> np.ndarray:
    """bool [N]: the rows the slice model validated on (or trained on), as training split."""
    train, val = split_rows(cache, cache.index["fold"].to_numpy(), fold)
    return val if validation else train


def _validation_fold(bundle: Bundle) -> int:
    return int((bundle.config.get("training") or {}).get("fold", 0))


def _split_scans(cache: PreparedCache, fold: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training scans, validation scans) of the cache, each the rows of one readable scan
    in slice order; refused when either is empty or the scans are single slices."""
    groups = [g[cache.ok[g]] for g in scan_groups(cache) if cache.ok[g].any()]
    folds = cache.index["fold"].to_numpy()
    train, val = split_rows(cache, folds, fold)
    # Extra training sets stay out of the study model's training, as they always have.
    train &= folds != EXTRA_FOLD
    val_groups = [g for g in groups if val[g[0]]]
    train_groups = [g for g in groups if train[g[0]]]
    if not train_groups or not val_groups:
        raise StudyTrainingError(
            cache.root, f"need scans in both the training folds and the validation fold {fold}"
        )
    lengths = np.array([len(g) for g in groups])
    if np.median(lengths) < MIN_MEDIAN_SLICES:
        # A sequence model over one-slice "scans" (a folder of PNG slices) learns nothing a
        # slice model does not, and its outputs would silently replace the slice model's.
        raise StudyTrainingError(
            cache.root,
            f"{int((lengths < 2).sum())} of {len(groups)} scans are a single slice: the study "
            "model reads scans of several slices (RSNA studies, CQ500 series, NIfTI volumes)",
        )
    return train_groups, val_groups


def _fit_study(
    config: StudyConfig,
    bundle: Bundle,
    split: tuple[list[np.ndarray], list[np.ndarray]],
    emb: np.ndarray,
    labels: np.ndarray,
    slice_level: bool,
    device: torch.device,
) -> tuple[StudyModel, dict[str, Any]]:
    train_groups, val_groups = split
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
    if slice_level:
        scan_thresholds, scan_method = study_scan_thresholds(outputs, bundle, thresholds)
    else:  # already chosen on the scan outputs, by the same rule
        scan_thresholds, scan_method = dict(thresholds), f"{_threshold_rule(bundle)} {SCAN_OUTPUT}"
    study_config = {
        "kind": config.kind,
        "hidden": config.hidden,
        "epochs": config.epochs,
        "validation": final,
        "thresholds": thresholds,
        "threshold_method": method,
        # What the slice thresholds were tuned on. "scans": the labels are per scan, so no
        # slice output was ever scored against a label and the slice decisions are not a
        # tuned operating point.
        "threshold_level": "slices" if slice_level else "scans",
        # The scan head is an output of its own (pooled over the scan): its decisions need
        # thresholds chosen on it, which predict uses for the scan's "positive".
        "scan_thresholds": scan_thresholds,
        "scan_threshold_method": scan_method,
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
    labels are per slice, on scan outputs otherwise (the slice outputs then have no labels);
    a label with one class there keeps the slice model's threshold. ``outputs``:
    :func:`_outputs` of the validation scans."""
    sp, sy, cp, cy = outputs
    probs, truth = (sp, sy) if slice_level else (cp, cy)
    method = _threshold_rule(bundle)
    out = _choose(probs, truth, bundle.labels, method, dict(bundle.thresholds))
    where = "slices" if slice_level else "scans"
    return out, f"{method} on the study model's validation {where}"


def study_scan_thresholds(
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    bundle: Bundle,
    slice_thresholds: dict[str, float],
) -> tuple[dict[str, float], str]:
    """Thresholds for the study model's scan output, chosen by the same rule on the
    validation scans' scan outputs: the scan head pools the whole scan and is calibrated
    apart from the slice head, so a slice threshold can call every scan positive, or none. A
    label with one class among the validation scans keeps its slice threshold (what predict
    decided scans with before scan thresholds were chosen)."""
    _, _, cp, cy = outputs
    method = _threshold_rule(bundle)
    out = _choose(cp, cy, bundle.labels, method, dict(slice_thresholds))
    return out, f"{method} {SCAN_OUTPUT}"


def _threshold_rule(bundle: Bundle) -> str:
    """The rule the slice model's thresholds were chosen by (youden by default)."""
    recorded = str(bundle.config.get("threshold_method", "youden")).split(" ")[0]
    return recorded if recorded in ("youden", "calibrated") or ":" in recorded else "youden"


def _choose(
    probs: np.ndarray,
    truth: np.ndarray,
    names: list[str],
    method: str,
    fallback: dict[str, float],
) -> dict[str, float]:
    out = dict(fallback)
    for j, name in enumerate(names):
        known = truth[:, j] >= 0
        y = truth[known, j]
        if (y == 1).any() and (y == 0).any():
            out[name] = choose_threshold(y, probs[known, j], method)
    return out


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
