"""Session 25 lab: other ways to sum the members' votes, screened on saved lab21 members.

    .venv/bin/python research/recipe_lab/vote_screen.py h|s SEED[,SEED] RULE[,RULE...]

RULE: boundB (each logit clipped to +-B before the weighted sum; bound6 is what ships),
trimK (the K highest and K lowest weighted votes dropped), softB (B*tanh(logit/B) instead of
the clip). Prints pooled AUC, slices right at 0.5 and at a held-out calibrated threshold
(the product's rule, chosen on the other four folds' scores) and the slices wrong at 0.5.
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
import lab21
from mirror_lab import held_out_right

from ichscan.models.small_set import member_weights


def votes(lg: np.ndarray, rule: str) -> np.ndarray:
    """[V, N, M] member logits → [N] probability under RULE, mean over the views."""
    M = lg.shape[-1]
    w = np.array(member_weights((M - 3) // 2, blob_forest=True, pixel_reader=True))
    if rule.startswith("bound"):
        B = float(rule[5:])
        c = np.clip(lg, -B, B)
        z = (c * w).sum(-1)
    elif rule.startswith("trim"):
        k = int(rule[4:])
        c = np.clip(lg, -6, 6) * w  # weighted contributions
        s = np.sort(c, -1)
        z = s[..., k : M - k].sum(-1)  # the k highest and k lowest dropped
    elif rule.startswith("soft"):
        B = float(rule[4:])
        z = (B * np.tanh(lg / B) * w).sum(-1)
    else:
        raise SystemExit(f"unknown rule {rule!r}: boundB, trimK or softB")
    return (1 / (1 + np.exp(-z))).mean(0)


rules = sys.argv[3].split(",")
tag = sys.argv[1]
for seed in [int(s) for s in sys.argv[2].split(",")]:
    ref = np.load(lab21.ROOT / f"{tag}_members_s{seed}.npz", allow_pickle=True)
    y, ids = ref["y"], ref["ids"]
    for rule in rules:
        ps, rs = [], []
        for f in range(5):
            ps.append(votes(ref[f"logits_{f}"], rule))
            rs.append(ref[f"val_{f}"])
        p, r = np.concatenate(ps), np.concatenate(rs)
        fid = np.concatenate([np.full(len(x), f) for f, x in enumerate(rs)])
        cal = held_out_right(y[r], p, fid)
        wrong = [ids[i] for i, q in zip(r, p, strict=True) if (q >= 0.5) != y[i]]
        print(
            tag,
            seed,
            f"{rule:8s} AUC {roc_auc_score(y[r], p):.4f}",
            f"right {int(((p >= 0.5) == y[r]).sum())} cal {cal}",
            f"wrong {' '.join(sorted(wrong))}",
        )
