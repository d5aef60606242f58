"""Training the pixel reader (ichscan.models.pixel_reader) from a few hundred slices.

A slice label says a bleed is somewhere, not where; a network trained from scratch on 150
whole slices with such labels learns the dataset, not blood. So it trains on 80 px patches of
the 320 px crop (40 px of its input), whose label is its centre's, from three sources:

- synthetic bleeds: each epoch, each real negative training slice gets one new ellipse,
  raised over the tissue with a soft edge and, half the time, a darker rim of oedema; the
  patch around it (centre jittered by up to 8 px) is blood. Kept under saturation, since
  calcium and bone saturate a brain window and blood does not;
- hard negatives: the brightest point of each real negative slice at first (calcified
  plexus or pineal, a seam of bone at the skull base), then, from epoch ``MINE_FROM``, the
  cell the network itself scores highest on it; plus one random brain point;
- real positives as multiple-instance bags: from epoch ``MINE_FROM``, the cell it scores
  highest on each real positive slice is blood (a positive slice holds blood somewhere; its
  most blood-like cell is the best guess of where).

A patch's logit is the largest of its four central cells. research/recipe_lab/SESSION19.md
has the screening: on head_ct this reader alone reached a mean AUC of 0.97 over four lab
splits, and in the ensemble it turned 8 more of 600 head_ct slices right at 0.5.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ichscan.models.pixel_reader import CELL, PixelNet, brain_cells, halved
from ichscan.preprocess.head_crop import brain_region
from ichscan.threads import torch_threads

log = logging.getLogger(__name__)

EPOCHS = 12
MINE_FROM = 2
BATCH = 32
LR = 2e-3
PATCH = 80  # crop px a training patch spans (40 px of the network's input)
JITTER = 8  # px a synthetic bleed's patch centre moves
# Synthetic bleeds, in grey levels of the 8-bit brain window and px of the 320 px crop
AXES = (3.0, 12.0)  # semi-axes
RAISE = (50.0, 110.0)  # over the tissue
CEILING = 245.0  # under the saturated grey (250+) of calcium and bone
RIM = (2, 4, 10.0, 25.0)  # oedema: width px (low, high), darker by (low, high)
MIN_BRAIN_PX = 500


@dataclass
class BleedSite:
    """A negative slice's brain, its depth and its plain tissue: where a synthetic bleed may
    go. Computed once per slice and reused by every fit of a run (inner folds included)."""

    brain: np.ndarray
    depth: np.ndarray
    tissue: np.ndarray
    brightest: tuple[int, int]


def bleed_site(grey: np.ndarray) -> BleedSite | None:
    """None for a slice with too little brain to place a bleed in."""
    brain = brain_region(grey)
    if brain.sum() < MIN_BRAIN_PX:
        return None
    g = grey.astype(np.float32)
    med = float(np.median(g[brain]))
    smooth = ndi.uniform_filter(g, 5) * brain
    r, c = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return BleedSite(
        brain,
        ndi.distance_transform_edt(brain),
        np.abs(ndi.uniform_filter(g, 9) - med) < 20,
        (int(r), int(c)),
    )


def ellipse_distance(
    shape: tuple[int, int], centre: tuple, axes: tuple, theta: float
) -> np.ndarray:
    """(u/a)² + (v/b)² of every pixel for an ellipse at ``centre`` (row, col) with semi-axes
    ``axes`` turned by ``theta``: at most 1 inside it."""
    (r, c), (a, b) = centre, axes
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    u = (xx - c) * np.cos(theta) + (yy - r) * np.sin(theta)
    v = -(xx - c) * np.sin(theta) + (yy - r) * np.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2


def insert_bleed(
    grey: np.ndarray, site: BleedSite, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float]] | None:
    """(the slice with one synthetic bleed, the bleed's centre); None without room."""
    a, b = rng.uniform(*AXES, size=2)
    room = np.argwhere((site.depth > max(a, b) + 6) & site.tissue)
    if not len(room):
        return None
    r, c = room[rng.integers(len(room))]
    inside = ellipse_distance(grey.shape, (r, c), (a, b), rng.uniform(0, np.pi)) <= 1
    g = grey.astype(np.float32)
    soft = ndi.gaussian_filter(inside.astype(np.float32), 1.0)
    out = g.copy()
    if rng.random() < 0.5:
        width = int(rng.integers(RIM[0], RIM[1] + 1))
        ring = ndi.binary_dilation(inside, iterations=width) & ~inside & site.brain
        out[ring] -= rng.uniform(RIM[2], RIM[3])
    raised = np.minimum(g + rng.uniform(*RAISE), CEILING)
    out = np.where(soft > 0, soft * np.maximum(raised, out) + (1 - soft) * out, out)
    centre = np.argwhere(inside).mean(0)
    return np.clip(out, 0, 255).astype(np.uint8), (float(centre[0]), float(centre[1]))


def patch(grey: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """float32 [PATCH/2, PATCH/2] in [0, 1]: the halved crop around ``centre`` (crop px),
    zero outside the crop; the same pixels the network reads when it reads the whole slice."""
    half = PATCH // 2
    top, left = 2 * (int(centre[0] / 2) - half // 2), 2 * (int(centre[1] / 2) - half // 2)
    out = np.zeros((PATCH, PATCH), np.float32)
    h, w = grey.shape
    r0, c0, r1, c1 = max(top, 0), max(left, 0), min(top + PATCH, h), min(left + PATCH, w)
    if r0 < r1 and c0 < c1:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = grey[r0:r1, c0:c1]
    return out.reshape(half, 2, half, 2).mean((1, 3)) / 255.0


@torch.no_grad()
def top_cells(net: PixelNet, greys: np.ndarray, batch: int = 64) -> list[tuple[int, int]]:
    """Each slice's highest-scoring brain cell, as its centre in crop px."""
    net.eval()
    out: list[tuple[int, int]] = []
    for start in range(0, len(greys), batch):
        grey = torch.from_numpy(greys[start : start + batch]).float() / 255.0
        cells = net(halved(grey))
        cells = torch.where(brain_cells(grey), cells, torch.full_like(cells, -torch.inf))
        for k in cells.flatten(1).argmax(1).tolist():
            i, j = divmod(k, cells.shape[-1])
            out.append((i * CELL + CELL // 2, j * CELL + CELL // 2))
    return out


def fit_pixel_reader(
    greys: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    seed: int,
    sites: dict[int, BleedSite | None],
    epochs: int = EPOCHS,
) -> PixelNet:
    """Train on ``rows`` of ``greys`` (uint8 [N, H, W] brain crops) with labels ``y``.
    ``sites`` caches each negative row's BleedSite across calls (filled here as needed)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for i in rows[y[rows] == 0]:
        if int(i) not in sites:
            sites[int(i)] = bleed_site(greys[i])
    negs = np.array([i for i in rows if y[i] == 0 and sites[int(i)] is not None], dtype=np.int64)
    poss = rows[y[rows] == 1]
    net = PixelNet()
    hard = [sites[int(i)].brightest for i in negs]  # type: ignore[union-attr]
    per_epoch = 3 * len(negs) + len(poss)
    steps = max(1, epochs * -(-per_epoch // BATCH))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
    mid = PATCH // CELL // 2  # the patch's four central cells
    centre = slice(mid - 1, mid + 1)
    taken = 0
    with torch_threads(1):  # 40 px patches: one thread is as fast, and leaves the other core
        for epoch in range(epochs):
            xs: list[np.ndarray] = []
            ys: list[float] = []
            if epoch >= MINE_FROM:
                if len(negs):
                    hard = top_cells(net, greys[negs])
                if len(poss):
                    for i, (r, c) in zip(poss, top_cells(net, greys[poss]), strict=True):
                        xs.append(patch(greys[i], (r + rng.uniform(-4, 4), c + rng.uniform(-4, 4))))
                        ys.append(1.0)
            for j, i in enumerate(negs):
                site = sites[int(i)]
                assert site is not None
                made = insert_bleed(greys[i], site, rng)
                if made is not None:
                    img, (r, c) = made
                    jitter = rng.uniform(-JITTER, JITTER, 2)
                    xs.append(patch(img, (r + jitter[0], c + jitter[1])))
                    ys.append(1.0)
                room = np.argwhere(site.brain)
                xs.append(patch(greys[i], tuple(room[rng.integers(len(room))])))
                ys.append(0.0)
                xs.append(patch(greys[i], hard[j]))
                ys.append(0.0)
            if not xs:
                break
            x = torch.from_numpy(np.stack(xs))[:, None]
            target = torch.tensor(ys) * 0.9 + 0.05
            order = torch.randperm(len(x))
            net.train()
            for start in range(0, len(x), BATCH):
                b = order[start : start + BATCH]
                xb = x[b]
                flip = torch.rand(len(b)) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                xb = xb * torch.empty(len(b), 1, 1, 1).uniform_(0.92, 1.08)
                z = net(xb)[:, centre, centre].amax((1, 2))
                loss = F.binary_cross_entropy_with_logits(z, target[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if taken + 1 < steps:
                    schedule.step()
                taken += 1
    return net.eval()


def _fit_state(greys: np.ndarray, y: np.ndarray, rows: np.ndarray, seed: int) -> dict:
    return fit_pixel_reader(greys, y, rows, seed, {}).state_dict()


@contextmanager
def fits_beside(
    greys: np.ndarray, y: np.ndarray, jobs: Sequence[tuple[np.ndarray, int]]
) -> Iterator[list[Callable[[], PixelNet]]]:
    """Start the fits of ``jobs`` ((rows, seed) each) one after another in a spawned worker
    process; yield per job a call that waits for its reader. Leaving the block cancels the
    fits not started yet (an error elsewhere in training does not wait for them).

    The recipe's other fits run on one thread; this runs the pixel readers on the second
    core meanwhile (the five fits of a model took 5.4 of its 10.2 minutes in sequence). A
    process, not a thread, so each fit draws from its own torch random state and gives the
    same weights as in the training process. If no worker can be started (a sandbox without
    semaphores, say), the fits run here when asked for."""
    pool = None
    futures: list[Future] = []
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_fit_state, greys, y, rows, seed) for rows, seed in jobs]
    except (OSError, RuntimeError, NotImplementedError) as exc:
        log.info("pixel reader fits stay in this process: %s", exc)

    def getter(i: int) -> Callable[[], PixelNet]:
        def get() -> PixelNet:
            rows, seed = jobs[i]
            if futures:
                try:
                    net = PixelNet()
                    net.load_state_dict(futures[i].result())
                    return net.eval()
                except BrokenProcessPool as exc:
                    log.info("pixel reader worker stopped (%s): fitting here", exc)
            return fit_pixel_reader(greys, y, rows, seed, {})

        return get

    try:
        yield [getter(i) for i in range(len(jobs))]
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
