"""Session 14, lab only: does a 23rd blob feature, the share of a blob's near ring more than
75 grey levels under the brain's median (CSF rather than a bleed's rim of edema), help the
blob forest? The product's ``blob_table`` is forked at run time (its source with the one
feature added), the blob forest refitted per fold of saved `cv_members.py --no-inner` groups
whose shipped blob logits `vote_rules.py dump` cached, and the shipped rule scored with either
(pooled AUC, right at 0.5). Result in SESSION14.md: no help.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/dark_lab.py \
        CACHE BRAIN.npz+HEAD.npz+ZOOM.npz [...]
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
from blob_rules import fold_blob_logits
from scipy.special import expit
from vote_rules import blob_path, shipped

import ichscan.models.blobs
from ichscan.data.cache import PreparedCache
from ichscan.evaluate.metrics import roc_auc

CSF_BELOW = 75


def forked_blobs() -> types.ModuleType:
    source = Path(ichscan.models.blobs.__file__).read_text()
    edits = [
        ("N_BLOB_FEATURES = 22", f"N_BLOB_FEATURES = 23\n_CSF_BELOW = {CSF_BELOW}"),
        (
            "            float(dark[win][ring].mean()) if ring.any() else 0.0,\n",
            "            float(dark[win][ring].mean()) if ring.any() else 0.0,\n"
            "            float((gw[ring] < med - _CSF_BELOW).mean()) if ring.any() else 0.0,\n",
        ),
    ]
    for old, new in edits:
        assert source.count(old) == 1, f"blobs.py changed: {old!r}"
        source = source.replace(old, new)
    module = types.ModuleType("dark_blobs")
    exec(compile(source, "dark_blobs", "exec"), module.__dict__)
    return module


def main() -> None:
    cache_dir, groups = sys.argv[1], sys.argv[2:]
    blobs = forked_blobs()
    cache = PreparedCache(cache_dir)
    brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in np.flatnonzero(cache.ok)])
    tables = np.stack(
        [blobs.batch_blobs(brain), blobs.batch_blobs(np.ascontiguousarray(brain[..., ::-1]))]
    )
    for group in groups:
        runs = [np.load(p) for p in group.split("+")]
        cached = np.load(blob_path(group))
        ys, probs = [], {"ships": [], "dark": []}
        for fold, (_, y, readers, forest, dark) in enumerate(fold_blob_logits(tables, runs)):
            for name, blob in (("ships", cached[f"blob_{fold}"]), ("dark", dark)):
                probs[name].append(expit(shipped(readers, forest, blob)).mean(0))
            ys.append(y)
        y = np.concatenate(ys)
        line = [Path(group.split("+")[0]).stem]
        for name, parts in probs.items():
            p = np.concatenate(parts)
            line.append(f"{name}: AUC {roc_auc(y, p):.4f} right {int(((p >= 0.5) == y).sum())}")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
