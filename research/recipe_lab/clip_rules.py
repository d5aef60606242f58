"""Session 11: bounded votes. The MIL heads and the regressions give raw logits; one member
can outvote the others (head_ct 162, seed 0: Lite1's MIL head +19.4 against -3.9 to -2.1
from the other heads). Clipping every member's logit to [-k, k] before the weighted sum
bounds any one member's say. Scores saved `cv_members.py --no-inner` runs of the same folds
(the three brain readers, then the head reader, then the centre reader if given) at
several k (pooled AUC, right at 0.5).

    PYTHONPATH=src .venv/bin/python research/recipe_lab/clip_rules.py \
        BRAIN.npz+HEAD.npz[+ZOOM.npz] [...]
"""

from __future__ import annotations

import sys

import numpy as np
from scipy.special import expit
from zoom_rules import fold_parts, weighted_sum

from ichscan.evaluate.metrics import roc_auc

CLIPS = (None, 6.0, 4.0, 3.0, 2.0)


def main() -> None:
    for group in sys.argv[1:]:
        parts = list(fold_parts([np.load(p) for p in group.split("+")]))
        y = np.concatenate([p[1] for p in parts])
        line = []
        for k in CLIPS:
            p = np.concatenate([expit(weighted_sum(r, f, k)).mean(0) for _, _, r, f in parts])
            line.append(
                f"{'raw' if k is None else f'±{k:g}'}: {roc_auc(y, p):.4f} "
                f"{int(((p >= 0.5) == y).sum())}"
            )
        print(group.split("+")[0].rsplit("/", 1)[-1], "  ".join(line))


if __name__ == "__main__":
    main()
