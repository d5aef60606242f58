"""Density features: fixed length, zeros without a brain, and they see a bright bleed."""

from __future__ import annotations

import numpy as np

from ichscan.models.density import N_FEATURES, density_features


def brain_disc(bleed: bool) -> np.ndarray:
    yy, xx = np.mgrid[:320, :320]
    grey = np.where((yy - 160) ** 2 + (xx - 160) ** 2 < 120**2, 100, 0).astype(np.uint8)
    if bleed:
        grey[(yy - 130) ** 2 + (xx - 200) ** 2 < 20**2] = 200  # dense blood, one side
    return grey


def test_features_have_a_fixed_length_and_are_finite() -> None:
    f = density_features(brain_disc(False))
    assert f.shape == (N_FEATURES,) and f.dtype == np.float32
    assert np.isfinite(f).all()


def test_blank_slice_gives_zeros() -> None:
    assert not density_features(np.zeros((320, 320), np.uint8)).any()


def test_a_bleed_raises_brightness_and_asymmetry() -> None:
    normal, bleed = density_features(brain_disc(False)), density_features(brain_disc(True))
    # fraction >= 170 (index 4), largest blob share (index 16), mean |left - right| (26)
    for k in (4, 16, 26):
        assert bleed[k] > normal[k]


def test_a_bleed_in_a_smaller_compartment_is_seen() -> None:
    """At the skull base the brain crop keeps several parts (crop version 4); the features
    must look at all of them, not only the largest, or a temporal-lobe bleed is missed."""
    yy, xx = np.mgrid[:320, :320]
    grey = np.zeros((320, 320), np.uint8)
    grey[(yy - 200) ** 2 + (xx - 160) ** 2 < 90**2] = 100  # posterior fossa
    lobe = (yy - 60) ** 2 + (xx - 70) ** 2 < 45**2  # a temporal lobe, a quarter of its size
    grey[lobe] = 100
    normal = density_features(grey)
    grey[(yy - 60) ** 2 + (xx - 70) ** 2 < 15**2] = 200  # blood in the lobe
    bleed = density_features(grey)
    assert bleed[4] > normal[4]  # the share of the brain at >= 170
