"""Session 14, lab only: does a 23rd blob feature, the share of a blob's near ring more than
75 grey levels under the brain's median (CSF rather than a bleed's rim of edema), help the
blob forest? The product's ``blob_table`` is forked at run time (its source with the one
feature added), the blob forest refitted per fold of saved `cv_members.py --no-inner` groups
whose shipped blob logits `vote_rules.py dump` cached, and the shipped rule scored with either
(pooled AUC, right at 0.5). Result in SESSION14.md: no help.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/dark_lab.py \
        dump CACHE TABLES.npz BRAIN.npz+HEAD.npz+ZOOM.npz [...]
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/dark_lab.py \
        score BRAIN.npz+HEAD.npz+ZOOM.npz [...]
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
from blob_rules import blob_fit, dump_fold_logits
from vote_rules import lab_cli

import ichscan.models.blobs
from ichscan.data.cache import PreparedCache

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


def dark_path(group: str) -> Path:
    return Path(group.split("+")[0]).with_suffix(".dark.npz")


def dump(cache_dir: str, store: str, groups: list[str]) -> None:
    """The forked blob tables of every slice and its mirror (cached in ``store``), then each
    group's blob forest on them per fold, saved as ``dark_{fold}``."""
    if Path(store).exists():
        tables = np.load(store)["tables"]
    else:
        blobs = forked_blobs()
        cache = PreparedCache(cache_dir)
        brain = np.stack([np.asarray(cache[int(r)])[..., 0] for r in np.flatnonzero(cache.ok)])
        mirror = np.ascontiguousarray(brain[..., ::-1])
        tables = np.stack([blobs.batch_blobs(brain), blobs.batch_blobs(mirror)])
        np.savez(store, tables=tables)
    dump_fold_logits(groups, "dark", dark_path, blob_fit(tables))


if __name__ == "__main__":
    lab_cli("dark", dump, dark_path)
