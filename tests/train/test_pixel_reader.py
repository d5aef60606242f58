"""Training the pixel reader: its patches are what it reads, its bleeds are plausible, and it
learns a bleed from a calcification on slices it has not seen."""

from __future__ import annotations

import numpy as np
import torch

from ichscan.evaluate.metrics import roc_auc
from ichscan.models.pixel_reader import halved, pixel_logit
from ichscan.train.pixel_reader import (
    CEILING,
    PATCH,
    bleed_site,
    fit_pixel_reader,
    insert_bleed,
    patch,
)


def brain_crop(rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """A brain-cropped slice: noisy grey-matter disc, zero outside (the skull cut away)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    grey = np.where(r < size * 0.42, rng.normal(110, 6, (size, size)), 0)
    return np.clip(grey, 0, 255).astype(np.uint8)


def with_spot(grey: np.ndarray, rng: np.random.Generator, value: float, radius: float):
    yy, xx = np.mgrid[: grey.shape[0], : grey.shape[1]]
    c = grey.shape[0] / 2 + rng.uniform(-30, 30, 2)
    spot = np.hypot(yy - c[0], xx - c[1]) < radius
    out = grey.copy()
    out[spot] = value
    return out


def test_a_training_patch_is_exactly_what_the_network_reads_there() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (160, 160)).astype(np.uint8)
    whole = halved(torch.from_numpy(grey).float()[None] / 255.0)[0, 0].numpy()
    half = PATCH // 2
    for centre in [(80.0, 80.0), (81.7, 40.2), (10.0, 150.0)]:
        top, left = int(centre[0] / 2) - half // 2, int(centre[1] / 2) - half // 2
        want = np.zeros((half, half), np.float32)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + half, 80), min(left + half, 80)
        want[r0 - top : r1 - top, c0 - left : c1 - left] = whole[r0:r1, c0:c1]
        np.testing.assert_allclose(patch(grey, centre), want, atol=1e-6)


def test_a_synthetic_bleed_is_brighter_tissue_inside_the_brain_under_saturation() -> None:
    rng = np.random.default_rng(1)
    grey = brain_crop(rng)
    site = bleed_site(grey)
    assert site is not None
    made = insert_bleed(grey, site, rng)
    assert made is not None
    bled, (r, c) = made
    assert site.brain[int(r), int(c)]
    assert bled[int(r), int(c)] > grey[int(r), int(c)] + 30
    assert bled.max() <= max(int(CEILING), int(grey.max()))
    assert bleed_site(np.zeros((160, 160), np.uint8)) is None


def test_it_tells_a_bleed_from_a_calcification_on_slices_it_has_not_seen() -> None:
    """Real negatives carry a small saturated calcification; real positives a larger
    hyperdense oval under saturation. Trained on 24 slices, it ranks 16 new ones."""
    rng = np.random.default_rng(2)
    greys, y = [], []
    for i in range(40):
        grey = with_spot(brain_crop(rng), rng, 255, 3)  # calcified plexus, on both classes
        if i % 2:
            grey = with_spot(grey, rng, 200, rng.uniform(6, 10))
        greys.append(grey)
        y.append(i % 2)
    greys_a, y_a = np.stack(greys), np.array(y)
    torch.manual_seed(0)
    net = fit_pixel_reader(greys_a, y_a, np.arange(24), seed=0, sites={}, epochs=8)
    held = np.arange(24, 40)
    with torch.no_grad():
        z = pixel_logit(net, torch.from_numpy(greys_a[held]).float() / 255.0).numpy()
    assert roc_auc(y_a[held], z) >= 0.9


def test_the_same_seed_trains_the_same_reader() -> None:
    rng = np.random.default_rng(3)
    greys = np.stack([brain_crop(rng, 96) for _ in range(6)])
    y = np.array([0, 1, 0, 1, 0, 1])
    a = fit_pixel_reader(greys, y, np.arange(6), seed=5, sites={}, epochs=3)
    b = fit_pixel_reader(greys, y, np.arange(6), seed=5, sites={}, epochs=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_fits_in_the_worker_process_equal_fits_here(monkeypatch) -> None:
    """The recipe fits its pixel readers in a second process beside the other members: the
    weights must be the ones a fit in the training process gives, and without a worker
    (none can be started) the fit happens here."""
    import ichscan.train.pixel_reader as pr

    rng = np.random.default_rng(4)
    greys = np.stack([brain_crop(rng, 96) for _ in range(6)])
    y = np.array([0, 1, 0, 1, 0, 1])
    rows = np.arange(6)
    here = fit_pixel_reader(greys, y, rows, seed=7, sites={})
    with pr.fits_beside(greys, y, [(rows, 7), (rows[:4], 8)]) as readers:
        beside = readers[0]()
    for k, v in here.state_dict().items():
        assert torch.equal(v, beside.state_dict()[k]), k

    def no_worker(*_args, **_kwargs):
        raise OSError("no semaphores here")

    monkeypatch.setattr(pr, "ProcessPoolExecutor", no_worker)
    with pr.fits_beside(greys, y, [(rows, 7)]) as readers:
        fallback = readers[0]()
    for k, v in here.state_dict().items():
        assert torch.equal(v, fallback.state_dict()[k]), k
