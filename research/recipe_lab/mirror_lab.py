"""Session 25 lab: the pixel reader with its mirror twin's evidence taken away.

The negative that all product splits but one get wrong on head_ct is 115 (0.62-0.74): calcified
choroid plexus in both atria. Its pixel reader fires (+1.2 on lab splits 21 and 22) in spite
of the hard negatives it mines: a patch cannot tell a calcified plexus from a bleed, but a
radiologist looks across the midline, where the plexus has a twin and a bleed rarely does.
MIRROR keeps the shipped reader (same fit, same seed) and changes only how its cell map is
pooled into a slice logit: each cell loses the positive evidence of the cells around its
mirror position (the map flipped left-right about the crop's centre, which the crop puts on
the head's bounding box, max-pooled over K x K cells against misalignment) before the
log-sum-exp. A cell whose mirror region is negative (a unilateral bleed, normal brain) is
unchanged; a bilateral pair cancels.

    PYTHONPATH=src .venv/bin/python research/recipe_lab/mirror_lab.py fit h|s SEED [SEED...]
    PYTHONPATH=src .venv/bin/python research/recipe_lab/mirror_lab.py score h|s SEED [SEED...]

`fit` refits each fold's shipped pixel reader exactly as lab21.py members did (same rows and
seed; checked against the saved logits) and saves the shipped and MIRROR logits of the
validation fold, identity and mirror views. `score` swaps them into the saved members and
prints pooled AUC, slices right at 0.5 and at a held-out calibrated threshold (the product's
rule, chosen on the other four folds' scores). Screened on development splits only, with no
rule and nothing judged: SESSION25.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
import lab21

from ichscan.evaluate.metrics import calibrated_threshold
from ichscan.models.pixel_reader import brain_cells, halved, pooled
from ichscan.threads import torch_threads
from ichscan.train import pixel_reader as pr
from ichscan.train import small_set as ss

KS = (3, 5)


def mirror_cells(cells: torch.Tensor, k: int) -> torch.Tensor:
    """[N, h, w] cell logits → the same less the positive evidence around each cell's mirror
    position (K x K cells, max)."""
    twin = F.max_pool2d(cells.flip(-1)[:, None], k, 1, k // 2)[:, 0]
    return cells - twin.clamp(min=0)


@torch.no_grad()
def logits(net: torch.nn.Module, brain: np.ndarray) -> dict[str, np.ndarray]:
    """{'shipped', 'mirror3', 'mirror5'}: [2, N] logits of the identity and mirror views."""
    out: dict[str, list[np.ndarray]] = {}
    grey = torch.from_numpy(brain).float() / 255.0
    for view in (grey, grey.flip(-1)):
        cells, inside = net(halved(view)), brain_cells(view)
        out.setdefault("shipped", []).append(pooled(cells, inside).numpy())
        for k in KS:
            out.setdefault(f"mirror{k}", []).append(pooled(mirror_cells(cells, k), inside).numpy())
    return {name: np.stack(v) for name, v in out.items()}


def fit(tag: str, seeds: list[int]) -> None:
    cache = lab21.cache_of(tag)
    labels = cache.labels()[:, 0]
    rows = np.flatnonzero(cache.ok & (labels >= 0))
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    y = labels[rows].astype(np.int64)
    for seed in seeds:
        out = lab21.ROOT / f"{tag}_mirror_s{seed}.npz"
        if out.exists():
            continue
        ref = np.load(lab21.ROOT / f"{tag}_members_s{seed}.npz", allow_pickle=True)
        folds, source = ref["folds"], np.where(ref["folds"] == -2, 1, 0)
        saved = {}
        for fold in range(5):
            t0 = time.monotonic()
            tr, va = lab21.fold_rows(folds, fold, source)
            assert np.array_equal(va, ref[f"val_{fold}"])
            with torch_threads(1):
                net = pr.fit_pixel_reader(brain, y, tr, seed * 10 + fold, {}).eval()
            for name, v in logits(net, brain[va]).items():
                saved[f"{name}_{fold}"] = v
            gap = np.abs(saved[f"shipped_{fold}"] - ref[f"logits_{fold}"][..., -1]).max()
            print(f"{tag} s{seed} f{fold}: {time.monotonic() - t0:.0f} s, refit gap {gap:.2g}")
            if gap > 1e-3:
                raise SystemExit("the refit is not the members' pixel reader")
        np.savez(out, **saved)


def held_out_right(y: np.ndarray, p: np.ndarray, fold: np.ndarray) -> int:
    right = 0
    for f in np.unique(fold):
        mine = fold == f
        right += int(((p[mine] >= calibrated_threshold(y[~mine], p[~mine])) == y[mine]).sum())
    return right


def score(tag: str, seeds: list[int]) -> None:
    for seed in seeds:
        ref = np.load(lab21.ROOT / f"{tag}_members_s{seed}.npz", allow_pickle=True)
        mine = np.load(lab21.ROOT / f"{tag}_mirror_s{seed}.npz")
        y, ids = ref["y"], ref["ids"]
        names = ["shipped"] + [f"mirror{k}" for k in KS]
        cols: dict[str, list[np.ndarray]] = {n: [] for n in names}
        rows, fold_of = [], []
        for fold in range(5):
            va, lg = ref[f"val_{fold}"], ref[f"logits_{fold}"]
            rows.append(va)
            fold_of.append(np.full(len(va), fold))
            for n in names:
                swapped = lg.copy()
                swapped[..., -1] = mine[f"{n}_{fold}"]
                cols[n].append(ss.combine(swapped))
        r, fid = np.concatenate(rows), np.concatenate(fold_of)
        for n in names:
            p = np.concatenate(cols[n])
            wrong = sorted(ids[i] for i, q in zip(r, p, strict=True) if (q >= 0.5) != y[i])
            hard = {ids[i]: q for i, q in zip(r, p, strict=True)}
            shown = " ".join(f"{h}:{hard[h]:.2f}" for h in lab21.HARD if h in hard)
            print(
                f"{tag} s{seed} {n:8s} AUC {roc_auc_score(y[r], p):.4f} "
                f"right@0.5 {int(((p >= 0.5) == y[r]).sum())} "
                f"right@cal {held_out_right(y[r], p, fid)}  {shown}"
                + (f"  wrong@0.5: {' '.join(wrong)}" if tag == "h" else "")
            )


if __name__ == "__main__":
    command, tag, *rest = sys.argv[1:]
    (fit if command == "fit" else score)(tag, [int(s) for s in rest])
