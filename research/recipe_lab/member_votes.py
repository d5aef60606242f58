"""Session 25 lab: each member's logit (mean of the two views) on the slices that decide
head_ct, from a saved lab21 members file. Columns: the MIL heads (Lite0, Lite1, Lite2 on the
brain crop, Lite0 on the head crop, Lite0 on the centre zoom), the pooled regressions in the
same order, the density forest, the blob forest, the pixel reader.

    .venv/bin/python research/recipe_lab/member_votes.py h|s SEED
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lab21

from ichscan.train import small_set as ss

tag, seed = sys.argv[1], int(sys.argv[2])
ref = np.load(lab21.ROOT / f"{tag}_members_s{seed}.npz", allow_pickle=True)
y, ids = ref["y"], ref["ids"]
HARD = [*lab21.HARD, "113", "092", "162"]  # and three that decided earlier splits
for fold in range(5):
    va, lg = ref[f"val_{fold}"], ref[f"logits_{fold}"]
    p = ss.combine(lg)
    for j, i in enumerate(va):
        if ids[i] in HARD:
            m = lg[:, j].mean(0)
            print(ids[i], y[i], f"p={p[j]:.2f}", " ".join(f"{v:+.1f}" for v in m))
