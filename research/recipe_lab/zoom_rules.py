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
from head_rules import score_line
from scipy.special import expit


def _probability(z: np.ndarray) -> np.ndarray:
    """[V, N] logits → [N]: sigmoid, mean over views (identity and mirror)."""
    return expit(z).mean(axis=0)


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


def weighted_sum(
    readers: list[np.ndarray],
    forest: np.ndarray,
    clip: float | None = None,
    regressions: int | None = None,
) -> np.ndarray:
    """The shipped sum (MIL 0.5, regressions 0.25, forest 0.25, each share split over the
    readers; member_weights) of [V, N] logits; ``clip``: each member's logit clipped to
    [-clip, clip] first; ``regressions``: only the first N readers' regressions count."""
    bound = (lambda v: v) if clip is None else (lambda v: np.clip(v, -clip, clip))
    reg = readers[: regressions or len(readers)]
    return (
        sum(bound(r[..., 0]) for r in readers) * (0.5 / len(readers))
        + sum(bound(r[..., 1]) for r in reg) * (0.25 / len(reg))
        + 0.25 * bound(forest[..., 0])
    )


def rules(runs: list[np.lib.npyio.NpzFile]) -> tuple[np.ndarray, dict]:
    ys, out = [], {"4": [], "5": [], "5mil": [], "3": [], "3z": []}
    for _, y, readers, forest in fold_parts(runs):
        brain, head, centre = readers[:3], readers[3], readers[4]
        out["4"].append(_probability(weighted_sum([*brain, head], forest)))
        out["5"].append(_probability(weighted_sum([*brain, head, centre], forest)))
        out["5mil"].append(_probability(weighted_sum([*brain, head, centre], forest, None, 4)))
        out["3"].append(_probability(weighted_sum(brain, forest)))
        out["3z"].append(_probability(weighted_sum([*brain, centre], forest)))
        ys.append(y)
    return np.concatenate(ys), {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    for group in sys.argv[1:]:
        y, scores = rules([np.load(p) for p in group.split("+")])
        print(score_line(group, y, scores))


if __name__ == "__main__":
    main()
