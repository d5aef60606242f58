"""k-fold cross-validation of a training recipe: one model per fold, out-of-fold predictions
pooled, so a small dataset is judged on every image once and never on a lucky split."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ichscan.data.cache import PreparedCache
from ichscan.models.bundle import load_bundle
from ichscan.train.dataset import SliceDataset
from ichscan.train.loop import TrainConfig, pick_device, train


def bundle_probabilities(
    model_dir: str | Path, cache: PreparedCache, rows: np.ndarray, device: torch.device
) -> np.ndarray:
    """[N, L] probabilities of cache rows by a bundle, computed by the predictor's own
    backend (members averaged) with the views the bundle names (`input.tta`; a fine-tuned
    bundle names none, so no flip): cross-validation scores what `predict` does, and what
    the bundle's thresholds were chosen on."""
    from ichscan.infer.predictor import TorchBackend

    bundle = load_bundle(model_dir, device)
    dataset = SliceDataset(cache, rows, input_kind=bundle.input["kind"])
    # The rule Predictor follows when no --tta is given.
    tta = "hflip" in bundle.input.get("tta", [])
    backend = TorchBackend(bundle, device, 32, tta=tta)
    out = []
    for start in range(0, len(dataset), 32):
        x = np.stack([dataset[i][0].numpy() for i in range(start, min(len(dataset), start + 32))])
        out.append(backend.slices(x)[0])
    return np.concatenate(out) if out else np.zeros((0, len(bundle.labels)))


def cross_validate(
    data: str,
    out: str,
    *,
    folds: int = 5,
    seed: int = 0,
    extra_train: list[str] | tuple[str, ...] = (),
    **overrides: Any,
) -> dict[str, Any]:
    """Train one model per fold with the default recipe (plus `overrides`); return pooled
    out-of-fold labels `y`, probabilities `p` and decisions (first label) at each bundle's
    own threshold and at a Youden threshold of the other folds, the per-fold AUCs and
    training minutes; `image_id` names each prediction's image."""
    from ichscan.evaluate.metrics import roc_auc

    device = pick_device(overrides.get("device", "auto"))
    ys, ps, fold_ids, minutes, aucs, own, ids, recipes = [], [], [], [], [], [], [], set()
    cache_dir = None
    for fold in range(folds):
        config = replace(
            TrainConfig(data=data, out=f"{out}/fold-{fold}"),
            fold=fold,
            folds=folds,
            seed=seed,
            extra_train=tuple(extra_train),
            **overrides,
        )
        if cache_dir is not None:  # prepare once, reuse for every fold
            config = replace(config, data=str(cache_dir))
        start = time.monotonic()
        summary = train(config)
        minutes.append((time.monotonic() - start) / 60)
        recipes.add(summary.get("recipe", "finetune"))
        cache_dir = cache_dir or Path(config.out) / "cache"
        cache = PreparedCache(cache_dir)
        folds_col = cache.index["fold"].to_numpy()
        rows = np.flatnonzero((folds_col == fold) & cache.ok)
        p = bundle_probabilities(config.out, cache, rows, device)[:, 0]
        y = cache.labels()[rows, 0]
        ids.append(cache.index["image_id"].to_numpy()[rows].astype(str))
        threshold = float(next(iter(summary["thresholds"].values())))
        own.append((p >= threshold).astype(int))
        ys.append(y)
        ps.append(p)
        fold_ids.append(np.full(len(y), fold))
        aucs.append(roc_auc(y, p))
        del summary
    y, p, fold_id = np.concatenate(ys), np.concatenate(ps), np.concatenate(fold_ids)
    return {
        "y": y,
        "p": p,
        "fold": fold_id,
        "image_id": np.concatenate(ids),
        "decision": held_out_decisions(y, p, fold_id),
        # what each fold's bundle decides at its own threshold (what `predict` prints)
        "bundle_decision": np.concatenate(own),
        "minutes": minutes,
        "fold_aucs": aucs,
        "recipes": recipes,
    }


def held_out_decisions(y: np.ndarray, p: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Decisions for each fold at the Youden threshold of the OTHER folds' out-of-fold
    predictions: no label of a fold is used to choose the threshold applied to it."""
    from ichscan.evaluate.metrics import youden_threshold

    out = np.zeros(len(y), dtype=int)
    for f in np.unique(fold):
        mine = fold == f
        threshold = youden_threshold(y[~mine], p[~mine])
        out[mine] = (p[mine] >= threshold).astype(int)
    return out
