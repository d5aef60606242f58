"""Session 18: a pixel reader, a small network trained from scratch on the brain crop's grey,
taught where blood is by synthetic bleeds.

Every member so far reads frozen ImageNet features (the MIL heads, the regressions) or
hand-made numbers (the two forests). The frozen features do not see a small plain hyperdense
oval as unusual (SESSION18.md, PatchCore). Here a small fully convolutional network (8 conv
layers, 16-64 channels, two 2x poolings) reads the grey itself, the 320 px crop halved to 160
px, and gives a map of logits at 40x40 cells.

It trains on 40 px patches (80 px of the crop), 10 epochs; each epoch, each negative training
slice of the fold (both sets) gives three: a copy with one new `synth_lab` ellipse, centred
on it within 8 px (blood); a random point of its brain (not blood); and its brightest point
(not blood: calcified plexus or pineal, a seam of bone at the skull base). A patch's logit is
the largest of its four central cells. Real positive slices are not used: their blood has no
outline. A slice's logit is the log-sum-exp (r = 5) over its brain cells, as the MIL heads
pool, averaged over the identity and the mirror view.

    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/pixel_lab.py \
        fit h|s SEED [SEED...]      # per-fold validation logits -> OUT/{h,s}_pixel_sSEED.npz
    PYTHONPATH=src:research/recipe_lab .venv/bin/python research/recipe_lab/pixel_lab.py \
        score h|s SEED [SEED...]    # alone, and in the shipped sum at WEIGHT (SESSION18.md)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from scipy.special import expit
from synth_lab import AXES, CEILING, RAISE, RIM, ellipse_distance
from torch import nn
from vote_rules import BOUND, blob_path, shipped
from zoom_rules import fold_parts

from ichscan.evaluate.metrics import roc_auc
from ichscan.preprocess.head_crop import brain_region

sys.path.insert(0, str(Path(__file__).parent))
from cv_members import split

from ichscan.data.cache import PreparedCache
from ichscan.train import small_set as ss

CACHES = {
    "h": "/tmp/s11/bench/h0/head_ct/fold-0/cache",
    "s": "/tmp/s11/bench/s0/rsna_png/fold-0/cache",
}
OUT = Path("/tmp/s18/pixel")
SIZE = 160  # network input: the 320 px crop halved
CELL = 4  # input px per map cell (two 2x poolings)
EPOCHS = 10
BATCH = 32
WEIGHT = 0.25  # the member's weight in the shipped sum (decided before any score)
HARD = ("070", "053", "041", "092", "106", "115", "162", "113")


def group(tag: str, seed: int) -> str:
    """The saved shipped-member runs of a lab split (sessions 11-15)."""
    lab = {5: "/tmp/s11/lab", 9: "/tmp/s13/lab", 14: "/tmp/s14/lab", 17: "/tmp/s15/lab"}
    d = lab[min(k for k in lab if seed <= k)]
    return "+".join(f"{d}/{tag}_{r}_s{seed}.npz" for r in ("brain", "head", "zoom"))


class PixelNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, dilation: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.body = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            *block(4 * w, 4 * w, 2),
            nn.Dropout2d(0.1),
            nn.Conv2d(4 * w, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.35) / 0.3)[:, 0]


def pooled(cells: torch.Tensor, brain: torch.Tensor, r: float = 5.0) -> torch.Tensor:
    """Log-sum-exp over each slice's brain cells, normalised by their number (as the MIL
    heads pool); a blank slice's logit is its map's mean."""
    masked = torch.where(brain, r * cells, torch.full_like(cells, -1e4))
    n = brain.flatten(1).sum(1).clamp(min=1)
    z = (torch.logsumexp(masked.flatten(1), 1) - torch.log(n)) / r
    return torch.where(brain.flatten(1).any(1), z, cells.flatten(1).mean(1))


def halve(g: np.ndarray) -> np.ndarray:
    return g.reshape(SIZE, 2, SIZE, 2).mean((1, 3)).astype(np.float32) / 255.0


def cell_share(mask: np.ndarray) -> np.ndarray:
    """[40, 40] share of each cell that ``mask`` (320 px) covers."""
    k = 320 // (SIZE // CELL)
    return mask.reshape(SIZE // CELL, k, SIZE // CELL, k).mean((1, 3))


class Bleeds:
    """Synthetic bleeds with their outline, from a negative slice's precomputed tissue."""

    def __init__(self, grey: np.ndarray) -> None:
        self.grey = grey
        brain = brain_region(grey)
        self.ok = brain.sum() >= 500
        if self.ok:
            g = grey.astype(np.float32)
            self.med = float(np.median(g[brain]))
            self.brain = brain
            self.depth = ndi.distance_transform_edt(brain)
            self.tissue = np.abs(ndi.uniform_filter(g, 9) - self.med) < 20

    def make(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        a, b = rng.uniform(*AXES, size=2)
        room = np.argwhere((self.depth > max(a, b) + 6) & self.tissue)
        if not len(room):
            return None
        r, c = room[rng.integers(len(room))]
        inside = ellipse_distance(self.grey.shape, (r, c), (a, b), rng.uniform(0, np.pi)) <= 1
        g = self.grey.astype(np.float32)
        soft = ndi.gaussian_filter(inside.astype(np.float32), 1.0)
        out = g.copy()
        if rng.random() < 0.5:
            width = int(rng.integers(RIM[0], RIM[1] + 1))
            ring = ndi.binary_dilation(inside, iterations=width) & ~inside & self.brain
            out[ring] -= rng.uniform(RIM[2], RIM[3])
        raised = np.minimum(g + rng.uniform(*RAISE), CEILING)
        out = np.where(soft > 0, soft * np.maximum(raised, out) + (1 - soft) * out, out)
        return np.clip(out, 0, 255).astype(np.uint8), inside


def load(tag: str):
    cache = PreparedCache(CACHES[tag])
    rows = np.flatnonzero(cache.ok)
    greys = np.stack([np.asarray(cache[int(r)])[..., 0] for r in rows])
    y = cache.labels()[rows, 0].astype(np.int64)
    source, _ = ss.source_ids(cache)
    folds = cache.index["fold"].to_numpy()[rows]
    ids = cache.index["image_id"].astype(str).to_numpy()[rows]
    return greys, y, source[rows], folds, ids


def brain_cells(greys: np.ndarray) -> np.ndarray:
    """[N, 40, 40] bool: cells at least half inside the brain crop."""
    return np.stack([cell_share(g > 0) >= 0.5 for g in greys])


PATCH = 40  # px of the 160 px input a training patch spans (80 px of the crop)


def patch(img: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """[PATCH, PATCH] of the halved image around ``centre`` (320 px coordinates), zero-padded."""
    h = halve(img)
    r, c = int(centre[0] / 2) - PATCH // 2, int(centre[1] / 2) - PATCH // 2
    out = np.zeros((PATCH, PATCH), np.float32)
    r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + PATCH, SIZE), min(c + PATCH, SIZE)
    out[r0 - r : r1 - r, c0 - c : c1 - c] = h[r0:r1, c0:c1]
    return out


def brightest(grey: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """Where the brain crop is brightest (smoothed): a calcification, a seam of bone, or blood."""
    g = ndi.uniform_filter(grey.astype(np.float32), 5) * brain
    return np.unravel_index(int(np.argmax(g)), g.shape)


def fit(greys, y, tr, seed: int, bleeds: dict[int, Bleeds], epochs: int = EPOCHS) -> PixelNet:
    """Patches: a synthetic bleed (centre jittered by up to 8 px) is blood; a random brain
    point and the brightest point of a real negative are not."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PixelNet()
    negs = [i for i in tr if y[i] == 0 and bleeds[i].ok]
    hard = [patch(greys[i], brightest(greys[i], bleeds[i].brain)) for i in negs]
    per_epoch = 3 * len(negs)
    steps = epochs * ((per_epoch + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    centre = slice(PATCH // CELL // 2 - 1, PATCH // CELL // 2 + 1)
    for _ in range(epochs):
        xs, ys = [], []
        for j, i in enumerate(negs):
            made = bleeds[i].make(rng)
            if made is not None:
                img, inside = made
                r, c = np.argwhere(inside).mean(0) + rng.uniform(-8, 8, 2)
                xs.append(patch(img, (r, c)))
                ys.append(1.0)
            room = np.argwhere(bleeds[i].brain)
            xs.append(patch(greys[i], room[rng.integers(len(room))]))
            ys.append(0.0)
            xs.append(hard[j])
            ys.append(0.0)
        x = torch.from_numpy(np.stack(xs))[:, None]
        yy = torch.tensor(ys)
        order = torch.randperm(len(x))
        net.train()
        for start in range(0, len(x), BATCH):
            b = order[start : start + BATCH]
            xb = x[b]
            flip = torch.rand(len(b)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            xb = xb * torch.empty(len(b), 1, 1, 1).uniform_(0.92, 1.08)
            m = net(xb)
            z = m[:, centre, centre].amax((1, 2))
            loss = F.binary_cross_entropy_with_logits(z, yy[b] * 0.9 + 0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def logits(net: PixelNet, greys: np.ndarray) -> np.ndarray:
    """[2, N]: identity and mirror views' pooled logits."""
    x = torch.from_numpy(np.stack([halve(g) for g in greys]))[:, None]
    c = torch.from_numpy(brain_cells(greys))
    out = []
    for view in (x, x.flip(-1)):
        cells = c if view is x else c.flip(-1)
        out.append(pooled(net(view), cells))
    return torch.stack(out).numpy()


def run_fit(tag: str, seeds: list[int]) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    OUT.mkdir(parents=True, exist_ok=True)
    greys, y, source, folds0, _ = load(tag)
    bleeds = {i: Bleeds(greys[i]) for i in np.flatnonzero(y == 0)}
    for seed in seeds:
        out = OUT / f"{tag}_pixel_s{seed}.npz"
        if out.exists():
            continue
        folds = split(type("D", (), {"source": source, "y": y}), folds0, seed)
        saved = {}
        for fold in sorted(set(folds[folds >= 0])):
            t0 = time.monotonic()
            tr = np.flatnonzero((folds != fold) & ((source != 0) | (folds >= 0)))
            va = np.flatnonzero(folds == fold)
            net = fit(greys, y, tr, seed * 10 + fold, bleeds)
            saved[f"val_rows_{fold}"] = va
            saved[f"pixel_{fold}"] = logits(net, greys[va])
            print(f"{tag} seed {seed} fold {fold}: {time.monotonic() - t0:.0f} s", flush=True)
        np.savez(out, **saved)


def run_score(tag: str, seeds: list[int]) -> None:
    ids = load(tag)[4]
    totals = {k: [0, 0, []] for k in ("ships", "pixel", "alone")}
    for seed in seeds:
        pix = np.load(OUT / f"{tag}_pixel_s{seed}.npz")
        g = group(tag, seed)
        runs = [np.load(p) for p in g.split("+")]
        blobs = np.load(blob_path(g))
        ys, rows, probs = [], [], {k: [] for k in totals}
        for fold, (r, y, readers, forest) in enumerate(fold_parts(runs)):
            assert np.array_equal(r, pix[f"val_rows_{fold}"]), "other folds"
            base = shipped(readers, forest, blobs[f"blob_{fold}"])
            p = pix[f"pixel_{fold}"]
            probs["ships"].append(expit(base).mean(0))
            probs["pixel"].append(expit(base + WEIGHT * np.clip(p, -BOUND, BOUND)).mean(0))
            probs["alone"].append(expit(p).mean(0))
            ys.append(y)
            rows.append(r)
        y, r = np.concatenate(ys), np.concatenate(rows)
        line = [f"{tag} s{seed}"]
        for k, t in totals.items():
            p = np.concatenate(probs[k])
            auc, right = roc_auc(y, p), int(((p >= 0.5) == y).sum())
            t[0] += right
            t[1] += len(y)
            t[2].append(auc)
            line.append(f"{k} {auc:.4f} {right}")
        hard = {ids[i]: q for i, q in zip(r, np.concatenate(probs["alone"]), strict=True)}
        line.append(" ".join(f"{h}:{hard[h]:.2f}" for h in HARD if h in hard))
        print("  ".join(line), flush=True)
    print(
        "all  "
        + "  ".join(
            f"{k}: mean AUC {np.mean(t[2]):.4f} right {t[0]} of {t[1]}" for k, t in totals.items()
        )
    )


if __name__ == "__main__":
    command, tag, *seeds = sys.argv[1:]
    (run_fit if command == "fit" else run_score)(tag, [int(s) for s in seeds])
