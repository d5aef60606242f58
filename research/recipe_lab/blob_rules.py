"""Session 12: the blob forest. Every bright blob of the brain crop is a sample
(ichscan.models.blobs.batch_blobs, identity and mirror); a forest learns from slice labels
by multiple-instance learning (ichscan.train.small_set.fit_blob_forest) and a slice scores
its most blood-like blob (ichscan.models.small_set.blob_logit): the product's own code.
Per fold of saved `cv_members.py --no-inner` runs (three brain readers, head, centre), the
blob forest is fitted on the fold's training slices and scored on its validation slices,
and the five-reader sum is compared with it (pooled AUC, right at 0.5):

- five: the shipped five-reader sum (session 11);
- blob, forest: the blob forest and the density forest alone;
- swap: the blob forest in the density forest's place (weight 0.25);
- add: the blob forest added at weight 0.25 beside the density forest (what ships);
- add±6, add±4: the same with every member's logit clipped to [-k, k] first (session 11's
  bounded votes, clip_rules.py; add±6 ships since session 13);
- add±6 b0.5: add±6 with the blob forest at weight 0.5 (session 13, a candidate).

``--main``: the blob forest learns from the main set's training slices only (like the
density forest) instead of all of them (like the MIL heads).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/blob_rules.py [--main] CACHE \
        BRAIN.npz+HEAD.npz+ZOOM.npz [...]

CACHE is the prepared cache the runs were made from (its row order is theirs).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from head_rules import score_line
from scipy.special import expit
from zoom_rules import fold_parts, weighted_sum

from ichscan.data.cache import PreparedCache
from ichscan.models.blobs import batch_blobs
from ichscan.models.small_set import blob_logit
from ichscan.train.small_set import fit_blob_forest

RULES = ("five", "blob", "forest", "swap", "add", "add±6", "add±4", "add±6 b0.5")


def blob_tables(cache_dir: str) -> np.ndarray:
    """[2, N, MAX_BLOBS, F]: the blob tables of every usable slice and of its mirror."""
    cache = PreparedCache(cache_dir)
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in np.flatnonzero(cache.ok)])
    return np.stack([batch_blobs(brain), batch_blobs(np.ascontiguousarray(brain[..., ::-1]))])


def fold_forest_logits(runs: list, fit: Callable):
    """Per fold of saved BRAIN[+HEAD[+ZOOM]] runs: fold_parts' (rows, labels, readers, density
    forest) and a blob forest's [V, N] validation logits, where ``fit(train, y, fold)`` gives
    the forest fitted on the fold's training slices and the [V, N, MAX_BLOBS, F] tables it
    reads."""
    y_all = runs[0]["y"]
    everything = np.arange(len(y_all))
    for fold, (rows, y, readers, forest) in enumerate(fold_parts(runs)):
        blob_forest, tables = fit(np.setdiff1d(everything, rows), y_all, fold)
        with torch.no_grad():
            blob = np.stack(
                [blob_logit(blob_forest, torch.from_numpy(t[rows])).numpy() for t in tables]
            )
        yield rows, y, readers, forest, blob


def blob_fit(tables: np.ndarray, fit_on: np.ndarray | None = None) -> Callable:
    """The ``fit`` of fold_forest_logits for the product's blob forest on ``tables`` ([2, N,
    MAX_BLOBS, F]), fitted on the fold's training slices among ``fit_on`` (default: all)."""

    def fit(train: np.ndarray, y: np.ndarray, fold: int):
        rows = train if fit_on is None else np.intersect1d(train, fit_on)
        return fit_blob_forest(tables, rows, y, fold), tables

    return fit


def fold_blob_logits(tables: np.ndarray, runs: list, fit_on: np.ndarray | None = None):
    """fold_forest_logits of the product's blob forest (blob_fit)."""
    return fold_forest_logits(runs, blob_fit(tables, fit_on))


def dump_fold_logits(groups: list[str], name: str, path: Callable, fit: Callable) -> None:
    """Save each group's fold_forest_logits(runs, fit) in ``path(group)`` as
    ``{name}_{fold}`` (what vote_rules.score reads)."""
    for group in groups:
        runs = [np.load(p) for p in group.split("+")]
        parts = fold_forest_logits(runs, fit)
        np.savez(path(group), **{f"{name}_{i}": p[-1] for i, p in enumerate(parts)})
        print("wrote", path(group), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--main", action="store_true", help="fit on the main set only")
    parser.add_argument("--wrong", action="store_true", help="list the slices add gets wrong")
    parser.add_argument("cache")
    parser.add_argument("groups", nargs="+")
    args = parser.parse_args()
    tables = blob_tables(args.cache)
    for group in args.groups:
        runs = [np.load(p) for p in group.split("+")]
        fit_on = np.flatnonzero(runs[0]["source"] == 0) if args.main else None
        scores: dict[str, list[np.ndarray]] = {k: [] for k in RULES}
        labels, wrong = [], []
        for rows, y, readers, forest, blob in fold_blob_logits(tables, runs, fit_on):
            five = weighted_sum(readers, forest)
            for name, z in (
                ("five", five),
                ("blob", blob),
                ("forest", forest[..., 0]),
                ("swap", weighted_sum(readers, blob[..., None])),
                ("add", five + 0.25 * blob),
                # bounded votes (session 11's clip_rules) with the blob forest beside them
                ("add±6", weighted_sum(readers, forest, 6.0) + 0.25 * np.clip(blob, -6, 6)),
                ("add±4", weighted_sum(readers, forest, 4.0) + 0.25 * np.clip(blob, -4, 4)),
                # session 13: the blob forest's weight doubled, under the shipped bound
                ("add±6 b0.5", weighted_sum(readers, forest, 6.0) + 0.5 * np.clip(blob, -6, 6)),
            ):
                scores[name].append(expit(z).mean(0))
            labels.append(y)
            add = scores["add"][-1]
            wrong += [
                f"{r}:{y[k]}:{add[k]:.2f}" for k, r in enumerate(rows) if (add[k] >= 0.5) != y[k]
            ]
        y = np.concatenate(labels)
        print(score_line(group, y, {k: np.concatenate(v) for k, v in scores.items()}), flush=True)
        if args.wrong:  # row:truth:probability, rows in the cache's usable-row order
            print("  add wrong:", " ".join(wrong), flush=True)


if __name__ == "__main__":
    main()
