"""Session 10: score three ways to combine the head reader with the three brain networks, on
saved `cv_members.py --no-inner` runs of the same folds (pooled AUC, right at 0.5).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/head_rules.py \
        BRAIN.npz+HEAD.npz [BRAIN2.npz+HEAD2.npz ...]

BRAIN.npz: a run of the three brain networks (members Lite0/1/2 MIL, Lite0/1/2 regression,
forest); HEAD.npz: `--crop head --backbones lite0` on the same cache and fold seed (its
forest, on the head crop, is not used: the product's forest reads the brain crop).

- 3: the shipped three-network sum (MIL 0.5, regressions 0.25, forest 0.25, each share
  split between the networks);
- 4: the head reader's MIL head and regression added to the shares (split over four), what
  the default trains since session 10;
- raise: the larger of the two sums per view (session 7's proposal: the head reader may
  raise a score but never lower one).
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


def rules(brain: np.lib.npyio.NpzFile, head: np.lib.npyio.NpzFile) -> tuple[np.ndarray, dict]:
    ys, out = [], {"3": [], "4": [], "raise": []}
    folds = sorted({int(k.rsplit("_", 1)[1]) for k in brain.files if k.startswith("val_rows_")})
    for f in folds:
        rows = brain[f"val_rows_{f}"]
        assert np.array_equal(rows, head[f"val_rows_{f}"]), "runs on different folds"
        a, b = brain[f"val_logits_{f}"], head[f"val_logits_{f}"]
        # embed's order for four readers: the MIL heads, then the regressions, then the forest
        four = np.concatenate([a[..., 0:3], b[..., :1], a[..., 3:6], b[..., 1:2], a[..., 6:]], -1)
        z3, z4 = a @ np.asarray(member_weights(3)), four @ np.asarray(member_weights(4))
        out["3"].append(_probability(z3))
        out["4"].append(_probability(z4))
        out["raise"].append(_probability(np.maximum(z3, z4)))
        ys.append(brain["y"][rows])
    return np.concatenate(ys), {k: np.concatenate(v) for k, v in out.items()}


def score_line(group: str, y: np.ndarray, scores: dict[str, np.ndarray]) -> str:
    """One printed line: the first run's name, then each rule's pooled AUC and right at 0.5."""
    return "  ".join(
        [group.split("+")[0].rsplit("/", 1)[-1]]
        + [
            f"{k}: AUC {roc_auc(y, p):.4f} right {int(((p >= 0.5) == y).sum())}"
            for k, p in scores.items()
        ]
    )


def main() -> None:
    for pair in sys.argv[1:]:
        brain, head = (np.load(p) for p in pair.split("+"))
        y, scores = rules(brain, head)
        print(score_line(pair, y, scores))


if __name__ == "__main__":
    main()
