"""Session 24 lab: a fold ensemble for free. `ichscan train` already fits four inner-CV
models (to choose its threshold) and throws them away; does averaging them with the final
model rank the held-out slices better?

    PYTHONPATH=src .venv/bin/python research/recipe_lab/bag_lab.py run head_ct|rsna_png SEED OUT
    PYTHONPATH=src .venv/bin/python research/recipe_lab/bag_lab.py score OUT SEED [SEED...]

`run` is `benchmarks/real_data.py --datasets NAME --with-other --seed SEED` (near-duplicates
grouped, the other set as extra training data, the product's own cross_validate and train),
with two hooks that change nothing the product computes: the inner-CV fit also scores each
inner model on the outer fold's held-out slices, and the final members are kept; both sets of
member logits (identity and mirror) are saved per fold beside the bundle's own probabilities
and threshold. `score` prints, per split, the product as shipped (the final model) against
the bags, at each bundle's own threshold and at 0.5. The candidates and the rule are in
SESSION24.md, written before any split was scored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from ichscan.models.small_set import BoundedVotes, member_weights
from ichscan.train import cv
from ichscan.train import small_set as ss

HARD = ["070", "053", "041", "040", "106", "115"]
STATE: dict = {}


def inner_oof_keeping(data, rows, seed, folds=ss.INNER_FOLDS, settings=ss.MILSettings(),
                      pixel_readers=None):  # noqa: ANN001, ANN201
    """ss.inner_oof, plus each inner model's logits of the slices outside ``rows``."""
    main, splits = ss.inner_folds(data, rows, seed, folds)
    held_out = np.setdiff1d(np.arange(len(data.y)), rows)
    members = len(member_weights(len(data.maps), blob_forest=True, pixel_reader=True))
    oof = np.zeros((2, len(main), members))
    inner = []
    for i, (fit_rows, held_idx, fold_seed) in enumerate(splits):
        pixel = pixel_readers[i] if pixel_readers else None
        fitted = ss.fit_members(data, fit_rows, fold_seed, settings, pixel)
        oof[:, held_idx] = ss.members_logits(fitted, data, main[held_idx])
        inner.append(ss.members_logits(fitted, data, held_out))
    STATE.update(data=data, held_out=held_out, inner=inner)
    if not splits:
        return main, np.full(oof.shape, np.nan)
    return main, oof


_fit_members = ss.fit_members


def fit_members_keeping(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    STATE["last"] = _fit_members(*args, **kwargs)
    return STATE["last"]


_train = cv.train


def train_keeping(config):  # noqa: ANN001, ANN201
    STATE.clear()
    summary = _train(config)
    data, held = STATE["data"], STATE["held_out"]
    final = ss.members_logits(STATE["last"], data, held)
    np.savez(
        Path(config.out) / "bag.npz",
        final=final,
        inner=np.stack(STATE["inner"]),
        y=data.y[held],
        threshold=float(next(iter(summary["thresholds"].values()))),
    )
    STATE.clear()
    return summary


def run(name: str, seed: int, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from real_data import LABEL, LABELS_ARG, SAME_PATIENT_R, grouped_view

    ss.inner_oof = inner_oof_keeping
    ss.fit_members = fit_members_keeping
    cv.train = train_keeping
    root = Path("/work/shared/data")
    out = out / f"seed{seed}"
    view, _ = grouped_view(root / name, out / "grouped" / name, SAME_PATIENT_R)
    result = cv.cross_validate(
        str(view),
        str(out / name),
        folds=5,
        seed=seed,
        extra_train=[str(root / o) for o in LABEL if o != name],
        labels=LABELS_ARG[name],
    )
    np.savez(
        out / f"{name}_cv.npz",
        y=result["y"],
        p=result["p"],
        fold=result["fold"],
        image_id=result["image_id"],
        own=result["bundle_decision"],
        minutes=np.asarray(result["minutes"]),
    )
    print(name, seed, "minutes per model", [round(m, 1) for m in result["minutes"]])


def votes_z(logits: np.ndarray) -> np.ndarray:
    """[V, N, M] member logits → [V, N] the bundle head's logit (ss.combine before sigmoid)."""
    m = logits.shape[-1]
    weights = member_weights((m - 3) // 2, blob_forest=True, pixel_reader=True)
    votes = BoundedVotes(m, weights, ss.VOTE_BOUND).double()
    with torch.no_grad():
        return votes(torch.from_numpy(np.asarray(logits, dtype=np.float64)))[..., 0].numpy()


def prob(z: np.ndarray) -> np.ndarray:
    """[V, N] logits → [N]: sigmoid, mean over views (the predictor's TTA)."""
    return (1.0 / (1.0 + np.exp(-z))).mean(0)


def candidates(final: np.ndarray, inner: np.ndarray) -> dict[str, np.ndarray]:
    zf = votes_z(final)
    zi = np.stack([votes_z(x) for x in inner])
    return {
        "shipped": prob(zf),
        "BAG5": prob((zf + zi.sum(0)) / (1 + len(zi))),
        "BAGHALF": prob(0.5 * zf + 0.5 * zi.mean(0)),
        "inner only": prob(zi.mean(0)),
    }


def score(out: Path, seeds: list[int]) -> None:
    from ichscan.evaluate.metrics import roc_auc

    table: dict = {}
    for name in ("head_ct", "rsna_png"):
        for seed in seeds:
            base = out / f"seed{seed}"
            if not (base / f"{name}_cv.npz").exists():
                continue
            cvr = np.load(base / f"{name}_cv.npz", allow_pickle=True)
            ys, ids, probs, own, drifts = [], [], {}, {}, []
            for fold in range(5):
                bag = np.load(base / name / f"fold-{fold}" / "bag.npz")
                mine = cvr["fold"] == fold
                # the saved labels must be the fold's, in the same order, and the final
                # model's combine() what the bundle itself predicted (up to the float16 cached
                # maps training reads against the maps predict computes: 0.0017 seen)
                assert (bag["y"] == cvr["y"][mine]).all(), (name, seed, fold)
                drift = np.abs(ss.combine(bag["final"]) - cvr["p"][mine]).max()
                assert drift < 1e-2, (name, seed, fold, drift)
                drifts.append(drift)
                ys.append(bag["y"])
                ids.append(cvr["image_id"][mine])
                for k, p in candidates(bag["final"], bag["inner"]).items():
                    probs.setdefault(k, []).append(p)
                    own.setdefault(k, []).append(p >= float(bag["threshold"]))
            y, iid = np.concatenate(ys), np.concatenate(ids)
            print(f"{name} seed {seed}: final model against the bundle, max |dp| {max(drifts):.4f}")
            for k in probs:
                p, d = np.concatenate(probs[k]), np.concatenate(own[k])
                hard = {h: round(float(p[iid == h][0]), 2) for h in HARD if (iid == h).any()}
                row = {
                    "auc": roc_auc(y, p),
                    "own": int((d == y).sum()),
                    "half": int(((p >= 0.5) == y).sum()),
                    "n": len(y),
                    "hard": hard if name == "head_ct" else {},
                }
                table.setdefault(name, {}).setdefault(k, {})[seed] = row
                print(
                    f"{name} seed {seed} {k:10s} AUC {row['auc']:.4f} own {row['own']}/{len(y)}"
                    f" at 0.5 {row['half']} {row['hard']}"
                )
    for name, rows in table.items():
        for k, per in rows.items():
            print(
                f"{name} {k:10s} splits {sorted(per)}: own {sum(r['own'] for r in per.values())}"
                f" at 0.5 {sum(r['half'] for r in per.values())} mean AUC "
                f"{np.mean([r['auc'] for r in per.values()]):.4f}"
            )
    (out / "score.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        score(Path(sys.argv[2]), [int(s) for s in sys.argv[3:]])
