"""Session 14: rules on the members' out-of-fold logits with the blob forest's logit cached,
so that many rules can be scored without refitting the blob forest each time.

``dump``: for each BRAIN+HEAD+ZOOM group of saved `cv_members.py --no-inner` runs, fit the
product's blob forest per fold (as blob_rules.py does) and save its [V, N] validation logits
beside the group's first run (``*.blob.npz``). ``score``: print each rule's pooled AUC and
slices right at 0.5 per group and summed over the groups.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/vote_rules.py \
        dump CACHE BRAIN.npz+HEAD.npz+ZOOM.npz [...]
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/vote_rules.py \
        score BRAIN.npz+HEAD.npz+ZOOM.npz [...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.special import expit
from zoom_rules import fold_parts, weighted_sum

from ichscan.evaluate.metrics import roc_auc

BOUND = 6.0


def blob_path(group: str) -> Path:
    first = Path(group.split("+")[0])
    return first.with_suffix(".blob.npz")


def dump(cache: str, groups: list[str]) -> None:
    from blob_rules import blob_fit, blob_tables, dump_fold_logits

    dump_fold_logits(groups, "blob", blob_path, blob_fit(blob_tables(cache)))


def shipped(readers, forest, blob, w_blob=0.25):
    return weighted_sum(readers, forest, BOUND) + w_blob * np.clip(blob, -BOUND, BOUND)


Rule = Callable[[list[np.ndarray], np.ndarray, np.ndarray], np.ndarray]

RULES: dict[str, Rule] = {
    "ships": shipped,
    # the blob forest's vote for blood counts twice (three times), its vote against as shipped
    "b+0.5": lambda r, f, b: shipped(r, f, b) + 0.25 * np.clip(b, 0, BOUND),
    "b+0.75": lambda r, f, b: shipped(r, f, b) + 0.5 * np.clip(b, 0, BOUND),
    "b0.5": lambda r, f, b: shipped(r, f, b, 0.5),
    # session 15: the density forest's vote against blood bounded at -2 (a whole-slice
    # statistic cannot rule out a small bleed)
    "dfloor": lambda r, f, b: (
        shipped(r, f, b)
        + 0.25 * (np.clip(f[..., 0], -2, BOUND) - np.clip(f[..., 0], -BOUND, BOUND))
    ),
}


def score(
    groups: list[str],
    rules: dict[str, Rule],
    candidates: dict[str, Callable[[str], Path]] | None = None,
) -> None:
    """``candidates``: name → where a group's other blob-forest logits are (``{name}_{fold}``,
    patch_lab.py, synth_lab.py), scored as the shipped rule with them in the blob forest's
    place."""
    candidates = candidates or {}
    names = [*rules, *candidates]
    totals = {k: [0, 0, []] for k in names}
    for group in groups:
        runs = [np.load(p) for p in group.split("+")]
        blobs = np.load(blob_path(group))
        others = {k: np.load(path(group)) for k, path in candidates.items()}
        ys, probs = [], {k: [] for k in names}
        for fold, (_, y, readers, forest) in enumerate(fold_parts(runs)):
            blob = blobs[f"blob_{fold}"]
            for k, rule in rules.items():
                probs[k].append(expit(rule(readers, forest, blob)).mean(0))
            for k, other in others.items():
                probs[k].append(expit(shipped(readers, forest, other[f"{k}_{fold}"])).mean(0))
            ys.append(y)
        y = np.concatenate(ys)
        parts = [Path(group.split("+")[0]).stem]
        parts += [tally(totals[k], k, y, np.concatenate(probs[k])) for k in names]
        print("  ".join(parts), flush=True)
    print_totals(totals)


def tally(total: list, name: str, y: np.ndarray, p: np.ndarray) -> str:
    """Add one group's pooled AUC and slices right at 0.5 to ``total`` ([right, n, AUCs]);
    the group's part of the printed line."""
    auc, right = roc_auc(y, p), int(((p >= 0.5) == y).sum())
    total[0] += right
    total[1] += len(y)
    total[2].append(auc)
    return f"{name}: {auc:.4f} {right}"


def print_totals(totals: dict[str, list]) -> None:
    print(
        "all  "
        + "  ".join(
            f"{k}: mean AUC {np.mean(t[2]):.4f} right {t[0]} of {t[1]}" for k, t in totals.items()
        )
    )


def lab_cli(name: str, dump_fn: Callable, path_fn: Callable[[str], Path]) -> None:
    """``dump CACHE STORE.npz GROUP...`` or ``score GROUP...`` for a blob-forest candidate
    whose per-fold logits ``dump_fn`` writes to ``path_fn(group)`` as ``{name}_{fold}``
    (patch_lab.py, synth_lab.py, dark_lab.py)."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("cache")
    d.add_argument("store", help="where the per-slice inputs of the candidate are cached")
    d.add_argument("groups", nargs="+")
    s = sub.add_parser("score")
    s.add_argument("groups", nargs="+")
    args = parser.parse_args()
    if args.command == "dump":
        dump_fn(args.cache, args.store, args.groups)
    else:
        score(args.groups, {"ships": shipped}, {name: path_fn})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("cache")
    d.add_argument("groups", nargs="+")
    s = sub.add_parser("score")
    s.add_argument("groups", nargs="+")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.cache, args.groups)
    else:
        score(args.groups, RULES)


if __name__ == "__main__":
    main()
