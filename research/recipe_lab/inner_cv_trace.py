"""Does the product's inner CV change what the final fit learns? Same rows, same seed:
fit_members alone, fit_members again (determinism), and inner_oof then fit_members, on the
fold of lab split 21 that holds head_ct 040, with seed 5 (the lab's own seed for that fold
is 212). Needs lab21.py prep first.

    PYTHONPATH=src .venv/bin/python research/recipe_lab/inner_cv_trace.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lab21

from ichscan.threads import torch_threads
from ichscan.train import small_set as ss

data, patients, ids, _ = lab21.features("h")
folds = lab21.lab_folds(data, patients, 21)
f = int(folds[list(ids).index("040")])
tr, va = lab21.fold_rows(folds, f, data.source)
seed = 5
with torch_threads(1):
    t = time.monotonic()
    a = ss.members_logits(ss.fit_members(data, tr, seed), data, va)
    print("A", time.monotonic() - t, flush=True)
    b = ss.members_logits(ss.fit_members(data, tr, seed), data, va)
    print("B", time.monotonic() - t, flush=True)
    ss.inner_oof(data, tr, seed)
    print("inner", time.monotonic() - t, flush=True)
    c = ss.members_logits(ss.fit_members(data, tr, seed), data, va)
    print("C", time.monotonic() - t, flush=True)
np.savez(lab21.ROOT / "inner_cv_trace.npz", a=a, b=b, c=c, va=va, ids=ids)
print("A-B max", np.abs(a - b).max(0).max(0))
print("A-C max", np.abs(a - c).max(0).max(0))
for name, x in (("A", a), ("B", b), ("C", c)):
    p = ss.combine(x)
    print(
        name,
        {ids[i]: round(float(q), 3) for i, q in zip(va, p, strict=True) if ids[i] in lab21.HARD},
    )
