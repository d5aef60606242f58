"""Session 11: does a fifth reader, Lite0 on the middle of the brain magnified
(`cv_members.py --crop zoom --backbones lite0`), help the shipped four? Scores saved
`cv_members.py --no-inner` runs of the same folds (pooled AUC, right at 0.5).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/zoom_rules.py \
        BRAIN.npz+HEAD.npz+ZOOM.npz [...]

- 4: the shipped four-reader sum (session 10);
- 5: the zoom reader's MIL head and regression added to the shares (split over five);
- 5mil: the zoom reader's MIL head only (its regression left out);
- 3, 3z: the three brain readers alone and with the zoom reader (what `--no-head-reader`
  would train).
"""

from __future__ import annotations

import sys

import numpy as np
from scipy.special import expit

from ichscan.evaluate.metrics import roc_auc
from ichscan.models.small_set import member_weights


def _probability(z: np.ndarray) -> np.ndarray:
    """[V, N] logits → [N]: sigmoid, mean over views (identity and mirror)."""
    return expit(z).mean(axis=0)


def _sum(parts: list[np.ndarray], with_regression: bool) -> np.ndarray:
    """parts: per-reader [V, N, 2] (MIL, regression) plus the brain forest [V, N, 1]."""
    *readers, forest = parts
    k = len(readers)
    mil = sum(r[..., 0] for r in readers) * (0.5 / k)
    reg_readers = readers if with_regression else readers[:-1]
    reg = sum(r[..., 1] for r in reg_readers) * (0.25 / len(reg_readers))
    return mil + reg + 0.25 * forest[..., 0]


def fold_parts(runs: list[np.lib.npyio.NpzFile]):
    """Per fold of BRAIN[, HEAD[, ZOOM]] runs: (rows, labels, per-reader [V, N, 2] MIL and
    regression logits, the brain forest's [V, N, 1])."""
    brain = runs[0]
    folds = sorted({int(k.rsplit("_", 1)[1]) for k in brain.files if k.startswith("val_rows_")})
    for f in folds:
        rows = brain[f"val_rows_{f}"]
        for other in runs[1:]:
            assert np.array_equal(rows, other[f"val_rows_{f}"]), "runs on different folds"
        a = brain[f"val_logits_{f}"]
        readers = [a[..., [i, i + 3]] for i in range(3)]
        readers += [r[f"val_logits_{f}"][..., :2] for r in runs[1:]]
        yield rows, brain["y"][rows], readers, a[..., 6:7]


def rules(runs: list[np.lib.npyio.NpzFile]) -> tuple[np.ndarray, np.ndarray, dict]:
    brain, head, zoom = runs
    ys, rows_all, out = [], [], {"4": [], "5": [], "5mil": [], "3": [], "3z": []}
    folds = sorted({int(k.rsplit("_", 1)[1]) for k in brain.files if k.startswith("val_rows_")})
    for f in folds:
        rows = brain[f"val_rows_{f}"]
        for other in (head, zoom):
            assert np.array_equal(rows, other[f"val_rows_{f}"]), "runs on different folds"
        a, b, c = (r[f"val_logits_{f}"] for r in runs)
        # a: Lite0/1/2 MIL, Lite0/1/2 regression, forest; b, c: MIL, regression, forest
        readers = [a[..., [i, i + 3]] for i in range(3)] + [b[..., :2]]
        forest = a[..., 6:7]
        four = np.concatenate([a[..., 0:3], b[..., :1], a[..., 3:6], b[..., 1:2], a[..., 6:]], -1)
        z4 = four @ np.asarray(member_weights(4))
        assert np.allclose(z4, _sum([*readers, forest], True), atol=1e-5)
        out["4"].append(_probability(z4))
        out["5"].append(_probability(_sum([*readers, c[..., :2], forest], True)))
        out["5mil"].append(_probability(_sum([*readers, c[..., :2], forest], False)))
        out["3"].append(_probability(_sum([*readers[:3], forest], True)))
        out["3z"].append(_probability(_sum([*readers[:3], c[..., :2], forest], True)))
        ys.append(brain["y"][rows])
        rows_all.append(rows)
    return (
        np.concatenate(ys),
        np.concatenate(rows_all),
        {k: np.concatenate(v) for k, v in out.items()},
    )


def main() -> None:
    for group in sys.argv[1:]:
        runs = [np.load(p) for p in group.split("+")]
        y, _, scores = rules(runs)
        print(
            group.split("+")[0].rsplit("/", 1)[-1],
            "  ".join(
                f"{k}: AUC {roc_auc(y, p):.4f} right {int(((p >= 0.5) == y).sum())}"
                for k, p in scores.items()
            ),
        )


if __name__ == "__main__":
    main()
