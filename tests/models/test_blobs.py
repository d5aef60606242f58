"""Blob tables: one row per bright blob of the brain, largest first, padding after; what a
row says tells blood (unsaturated, one-sided) from calcium (saturated, often paired)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichscan.models.blobs import (
    MAX_BLOBS,
    N_BLOB_FEATURES,
    batch_blobs,
    blob_present,
    blob_table,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
# columns of a row (ichscan.models.blobs.blob_table)
LOG_AREA, ABOVE_MEDIAN, SATURATED, MIRROR, COUNT = 0, 2, 5, 18, 20


def brain_disc(rng: np.random.Generator | None = None) -> np.ndarray:
    """A brain-cropped slice: a disc of brain at grey 100 (a little noise), zeros around."""
    yy, xx = np.mgrid[:320, :320]
    inside = (yy - 160) ** 2 + (xx - 160) ** 2 < 120**2
    noise = (rng or np.random.default_rng(0)).integers(-3, 4, (320, 320))
    return np.where(inside, 100 + noise, 0).astype(np.uint8)


def disc(grey: np.ndarray, y: int, x: int, r: int, value: int) -> None:
    yy, xx = np.mgrid[: grey.shape[0], : grey.shape[1]]
    grey[(yy - y) ** 2 + (xx - x) ** 2 <= r**2] = value


def present_rows(grey: np.ndarray) -> np.ndarray:
    table = blob_table(grey)
    assert table.shape == (MAX_BLOBS, N_BLOB_FEATURES) and table.dtype == np.float32
    return table[blob_present(table)]


def test_a_blank_slice_or_a_plain_brain_has_no_blobs() -> None:
    assert not blob_table(np.zeros((320, 320), np.uint8)).any()
    assert len(present_rows(brain_disc())) == 0


def test_a_bleed_is_one_unsaturated_one_sided_blob() -> None:
    grey = brain_disc()
    disc(grey, 130, 210, 8, 170)  # 70 grey levels over the brain: fresh blood, one side
    (row,) = present_rows(grey)
    assert row[LOG_AREA] == pytest.approx(np.log(np.pi * 8**2), abs=0.15)
    assert row[ABOVE_MEDIAN] == pytest.approx(70, abs=2)
    assert row[SATURATED] == 0
    assert row[MIRROR] == 0  # nothing bright in the other hemisphere
    assert not blob_table(grey)[1:].any()  # padding after the last blob


def test_paired_calcifications_are_saturated_and_mirror_each_other() -> None:
    grey = brain_disc()
    disc(grey, 190, 120, 5, 255)  # calcified choroid plexus, both trigones
    disc(grey, 190, 200, 5, 255)
    rows = present_rows(grey)
    assert len(rows) == 2
    assert (rows[:, SATURATED] == 1).all()
    assert (rows[:, MIRROR] > 0.8).all()


def test_the_largest_blobs_are_kept_and_all_are_counted() -> None:
    grey = brain_disc()
    spots = [(y, x) for y in range(80, 250, 30) for x in range(80, 250, 30)]  # 36 spots
    for k, (y, x) in enumerate(spots):
        disc(grey, y, x, 3 + (k == 7) * 4, 180)  # one of them larger
    rows = present_rows(grey)
    assert len(rows) == MAX_BLOBS
    assert rows[0, LOG_AREA] == rows[:, LOG_AREA].max() > rows[1, LOG_AREA]
    assert (rows[:, COUNT] == len(spots)).all()


@settings(max_examples=25, deadline=None)
@given(
    blobs=st.lists(
        st.tuples(
            st.integers(60, 260), st.integers(60, 260), st.integers(1, 12), st.integers(0, 255)
        ),
        max_size=24,
    ),
    seed=st.integers(0, 2**16),
)
def test_any_slice_gives_finite_rows_largest_first_then_padding(blobs, seed) -> None:
    grey = brain_disc(np.random.default_rng(seed))
    for y, x, r, value in blobs:
        disc(grey, y, x, r, value)
    table = blob_table(grey)
    present = blob_present(table)
    assert np.isfinite(table).all()
    k = int(present.sum())
    assert present[:k].all() and not table[k:].any()
    assert (np.diff(table[:k, LOG_AREA]) <= 1e-6).all()


def test_batch_blobs_stacks_slices_and_takes_an_empty_batch() -> None:
    grey = brain_disc()
    disc(grey, 130, 210, 8, 170)
    both = batch_blobs(np.stack([brain_disc(), grey]))
    assert both.shape == (2, MAX_BLOBS, N_BLOB_FEATURES)
    assert blob_present(both).sum(axis=1).tolist() == [0, 1]
    assert batch_blobs(np.zeros((0, 320, 320), np.uint8)).shape == (0, MAX_BLOBS, N_BLOB_FEATURES)


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (37, 5), (3, 90)])
def test_the_table_does_not_depend_on_where_the_brain_lies_in_the_square(dy, dx) -> None:
    """blob_table works on the brain's bounding box: moved within a larger square, or up to
    the square's edge, the same slice gives the same table (a bleed, a calcified pair and
    the skull's rim included)."""
    grey = brain_disc()
    disc(grey, 130, 210, 8, 170)
    disc(grey, 200, 120, 5, 255)
    disc(grey, 200, 200, 5, 255)
    disc(grey, 160, 45, 4, 180)  # at the brain's edge
    brain = grey[40:281, 40:281]  # the disc's bounding box, flush with the square's edge
    canvas = np.zeros((brain.shape[0] + 100, brain.shape[1] + 100), np.uint8)
    canvas[dy : dy + brain.shape[0], dx : dx + brain.shape[1]] = brain
    want = blob_table(grey)
    assert blob_present(want).sum() >= 3
    np.testing.assert_allclose(blob_table(brain), want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(blob_table(canvas), want, rtol=1e-6, atol=1e-5)


def real_brain(name: str) -> np.ndarray:
    from PIL import Image

    from ichscan.io.image import read_grey
    from ichscan.preprocess.head_crop import crop_slice

    grey = read_grey(SHARED / "head_ct" / "images" / name)
    brain = crop_slice(grey[..., None], "brain")[..., 0]
    return np.asarray(Image.fromarray(brain).resize((320, 320), Image.Resampling.BILINEAR))


@pytest.mark.skipif(not (SHARED / "head_ct").exists(), reason="../shared/data/head_ct absent")
def test_real_bleed_and_real_calcium_differ_where_the_forest_can_see_it() -> None:
    """head_ct 053, a small parietal bleed that the whole-slice density features score as
    normal: it is the slice's largest blob, with no saturated pixel. 115, a normal slice
    with calcified choroid plexus: its candidates include saturated ones."""
    bleed = present_rows(real_brain("053.png"))
    assert bleed[0, SATURATED] == 0 and bleed[0, ABOVE_MEDIAN] > 50
    calcium = present_rows(real_brain("115.png"))
    assert (calcium[:3, SATURATED] > 0.3).sum() == 2


@pytest.mark.skipif(not (SHARED / "head_ct").exists(), reason="../shared/data/head_ct absent")
def test_every_third_real_head_ct_slice_gives_a_well_formed_table() -> None:
    """RGB, RGBA and grey figures, some with letters on them."""
    names = sorted(p.name for p in (SHARED / "head_ct" / "images").glob("*.png"))[::3]
    assert len(names) == 50
    tables = batch_blobs(np.stack([real_brain(n) for n in names]))
    assert np.isfinite(tables).all()
    counts = blob_present(tables).sum(axis=1)
    assert counts.max() == MAX_BLOBS and (counts > 0).mean() > 0.9
